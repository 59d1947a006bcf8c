"""Evaluation: the paper's protocol (greedy decoding, then the benchmark metrics) and its tables.

3D-RFT reports every number after *greedy* decoding of the fine-tuned model, with the metrics
that the RL rewards are built from (docs/DESIGN.md, "Evaluation"):

    detection   per-category greedy matching at IoU > 0.25 and IoU > 0.5, TP/FP/FN summed over the
                dataset per category, P/R/F1 per category, the macro mean over the data set's
                fixed category list: VG LLM's ScanNet-20 for ScanNet (paper: F1@0.25 43.7,
                P 54.2, R 38.2 for 3D-RFT-4B); for the toy world the categories present
    grounding   Acc@0.25 / Acc@0.5 = share of samples whose box has IoU >= threshold; the box is
                predicted in the camera frame of the predicted frame (ScanRefer; 42.9 / 15.9)
    spatial     per question type: option accuracy (multiple choice) or MRA (numeric); overall
                = unweighted mean over the types present (VSI-Bench; average 62.8)

plus, for every task, the share of completions in the `<think>..</think><answer>..</answer>`
format with a parseable answer (the format reward being 1).

All parsing, IoU and matching is done by `rewards.py` (with `boxes.py`): the reward and the metric are the same
computation, which is the point of the paper. This file only aggregates.

Use it as a library (`evaluate(...)`, called by sft.py / grpo.py for their periodic evaluation)
or as a script:

    python eval.py --model runs/grpo/ckpt --data data/toy --split val --tasks detection,grounding \
        --limit 100 --seed 0 --out runs/grpo/eval.json
    python eval.py --model runs/grpo/ckpt --tasks grounding --limit 600 --seed 0,1,2 \
        --out "runs/grpo/eval_seed{seed}.json"      # three evaluation seeds, one model load
    python eval.py --compare runs/sft/eval.json runs/grpo/eval.json --names SFT,GRPO

Sections: settings -> small helpers -> detection -> grounding -> spatial -> scoring ->
generation -> evaluate -> tables -> command line.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any, Sequence

# Repeatable CPU runs: MKL otherwise picks matrix-multiply kernels by buffer alignment, so two runs
# (or a run and its resume) drift apart in the last bits; read when torch loads (docs/DESIGN.md section 8).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import numpy as np
import torch
from tqdm import tqdm

import data
import model as model_lib
import rewards
import runtime
import scenes  # the toy world's category list (TOY_CATEGORIES)
from boxes import box3d_iou, box_rotation, rotation_to_euler_zxy

# =====================================================================================
# Settings (nanoGPT style: every setting is a flag; the defaults are the comments' values)
# =====================================================================================

# The IoU thresholds of the published tables (detection F1@0.25 / @0.5, grounding Acc@0.25 / @0.5).
IOU_THRESHOLDS = (0.25, 0.5)


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag documents itself in --help."""
    p = argparse.ArgumentParser(
        description="Greedy evaluation of a 3D-RFT model on detection / grounding / spatial QA records, "
                    "or a side-by-side comparison of saved results (--compare).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # what to evaluate
    p.add_argument("--model", default="toy",  # "toy" = the random tiny model; else a checkpoint folder
                   help="'toy' (randomly initialised tiny model) or a local checkpoint directory")
    p.add_argument("--data", default="data/toy",  # the synthetic world's output folder (scenes.py)
                   help="data folder holding <split>/<task>.jsonl")
    p.add_argument("--split", default="val",  # held-out rooms
                   help="split folder inside --data")
    p.add_argument("--tasks", default="detection", type=parse_tasks,  # comma-separated
                   help=f"comma-separated tasks out of {','.join(data.TASKS)}")
    p.add_argument("--limit", default=None, type=runtime.int_at_least(1),  # None = every record of the split
                   help="evaluate a random subset of this many records per task (all if not given)")
    p.add_argument("--seed", default="0", type=parse_seeds,  # the "evaluation seed(s)": which subset --limit takes
                   help="seed of the random subset chosen by --limit (decoding is greedy, so it is "
                        "the only randomness); a comma-separated list (0,1,2) evaluates each in turn "
                        "with one model load, --out then naming a file per seed with {seed}")
    runtime.add_data_arguments(p)  # --media-root, --num-frames, --skip-bad, --max-seq-len
    runtime.add_model_arguments(p, training=False)  # --geometry(-dim), --dtype, --max-pixels, --min-pixels
    # how to run
    p.add_argument("--batch-size", default=32, type=runtime.int_at_least(1),  # prompts decoded together
                   help="prompts per generate() call")
    p.add_argument("--max-new-tokens", default=None, type=runtime.int_at_least(1),  # None = data.max_new_tokens
                   help="completion length limit (default per task, data.max_new_tokens: "
                        + ", ".join(f"{k} {data.max_new_tokens(k, False)}" for k in data.TASKS) + " for the toy, "
                        + ", ".join(f"{k} {data.max_new_tokens(k, True)}" for k in data.TASKS)
                        + " for a real checkpoint: VG LLM's / VSI-Bench's + 32 for the answer tags)")
    p.add_argument("--device", default="auto",  # auto = cuda when available, else cpu
                   help="torch device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--samples", default=3, type=runtime.int_at_least(0),  # completions kept in the JSON per task
                   help="number of example completions stored per task")
    p.add_argument("--no-progress", action="store_true",  # progress bar on stderr by default
                   help="hide the progress bar")
    # outputs
    p.add_argument("--out", default=None,  # None = only print the table
                   help="write the full results (metrics, settings, examples) to this JSON file")
    p.add_argument("--compare", nargs="+", default=None, metavar="RESULTS_JSON",  # no model is loaded
                   help="instead of evaluating, print saved results side by side (first = baseline)")
    p.add_argument("--names", default=None,  # None = the files' names
                   help="comma-separated column names for --compare")
    return p


def parse_tasks(text: str) -> tuple[str, ...]:
    """"detection,grounding" -> ("detection", "grounding"); an unknown task is an argparse error."""
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tasks if t not in data.TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or text!r}; choose from {', '.join(data.TASKS)}")
    return tasks


# =====================================================================================
# Small helpers
# =====================================================================================


def parse_seeds(text: str) -> list[int]:
    """--seed: "0" -> [0]; "0,1,2" -> [0, 1, 2] (each an evaluation of its own subset)."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of them") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} names a seed twice")
    return seeds


def safe_div(num: float, den: float) -> float:
    """num / den, and 0 when den == 0 (a category nobody predicted has precision 0, not NaN)."""
    return num / den if den else 0.0


def prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Counts plus precision, recall and F1 = 2TP / (2TP + FP + FN); any 0/0 is defined as 0.

    F1 written this way equals the harmonic mean of P and R whenever both are defined, and is 0
    (not undefined) for a category that has no prediction and no true positive.
    """
    return {
        "tp": tp, "fp": fp, "fn": fn,
        "precision": safe_div(tp, tp + fp),
        "recall": safe_div(tp, tp + fn),
        "f1": safe_div(2 * tp, 2 * tp + fp + fn),
    }


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0 for an empty list (a task with no records has nothing right)."""
    return safe_div(sum(values), len(values))


def answer_text(completion: str) -> str | None:
    """The answer a completion gives, read leniently as the published evaluations read output:
    the <answer> part of a well-formed completion, else a fenced ```json``` block, else the whole
    text (rewards.parse_answer_lenient). The format rate alone stays strict (R_format)."""
    return rewards.parse_answer_lenient(completion)


def as_tagged(answer: str | None) -> str:
    """A leniently read answer in the `<think></think><answer>..</answer>` form, so that the
    reward functions score it exactly as they score a tagged completion ("" if there is none)."""
    return "" if answer is None else data.wrap_answer(answer)


def format_rate(records: Sequence[dict], completions: Sequence[str]) -> float:
    """Share of completions whose format reward is 1 (tags right, answer parses for the task)."""
    return mean([float(rewards.format_reward(c, r) == 1.0) for c, r in zip(completions, records)])


def check_lengths(records: Sequence[dict], completions: Sequence[str],
                  truncated: Sequence[bool] | None = None) -> None:
    """One completion (and truncation flag) per record, or the scores would pair the wrong ones."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    if truncated is not None and len(truncated) != len(records):
        raise ValueError(f"{len(records)} records but {len(truncated)} truncation flags")


def truncated_share(truncated: Sequence[bool] | None) -> float | None:
    """Share of completions that hit the token budget (flags from generation); None if unknown."""
    return None if truncated is None else mean([float(bool(t)) for t in truncated])


# =====================================================================================
# Detection: per-category greedy matching, TP/FP/FN summed over the dataset
# =====================================================================================
# Which categories count in the "present" mean: those present in the ground truth of the
# evaluated records (VG LLM's fixed list is the "scannet20" mean, below). A category that
# is in the ground truth but never predicted scores P = R = F1 = 0 and *does* pull the macro mean
# down. A predicted label that appears in no ground truth box can never be right: its boxes are
# counted as false positives in a separate "other" bucket, reported (and included in the micro
# totals) but not in the macro mean, which averages over ground-truth categories only.
# Labels are compared as rewards.match_detections compares them: stripped and lower-cased (VG
# LLM compares them exactly; its ScanNet labels are lower-case).
#
# Answers are read leniently (answer_text, rewards.parse_boxes_lenient): the tagged form, a
# fenced or plain JSON list, or VG LLM's one-box-per-line text; invalid entries are dropped and
# the valid ones kept. A completion with no valid box predicts nothing: all its ground-truth
# boxes are false negatives. Since matching is same-label only, matching each category
# separately gives exactly the counts of matching the whole lists at once.
#
# Two macro means are reported. "present": over the categories in the evaluated ground truth.
# "scannet20": VG LLM's published rule (LaVi-Lab/VG-LLM 6fbdae6
# src/lmms_eval/tasks/threedod/utils.py, threedod_aggregate_results, list `cate20`): per category
# of a fixed list of 20, TP/FP/FN summed over the data set, P = TP/(TP+FP), R = TP/(TP+FN), F1 =
# 2PR/(P+R), each 0 when its denominator is 0, then the plain mean over all 20, so a category with
# no ground truth and no prediction counts 0 (a category with predictions but no ground truth
# too: P = 0). F1 = 2PR / (P+R) equals prf's 2TP / (2TP+FP+FN) whenever either is defined. VG LLM
# matches at IoU > 0.25 only (compute_ap's default); @0.5 is this project's addition.
#
# The headline (the top-level precision / recall / f1, the table's `detection/F1@t`) is the mean
# over the data set's fixed category list, `which_category_list`: a data set whose ground-truth
# labels are all toy-world categories (scenes.CATEGORY_NAMES) is the toy's, any other is taken
# as ScanNet (VG LLM's files; their labels, e.g. "couch", "bin", "sink", are not all toy
# categories), whose headline is the ScanNet-20 mean. For the toy the headline stays the
# present-category mean: it equals the mean over the toy's 8 categories whenever all 8 are in the
# evaluated ground truth (a 600-record held-out evaluation: 600 val scenes hold 176-257 objects of
# each), but a small periodic evaluation (--eval-limit) may miss some, and the fixed-list mean
# would then change the numbers the toy runs have always logged; it is reported beside, as "toy".
# `evaluate` decides the list from the whole records file, so a subset (--limit) keeps its list.

# VG LLM's ScanNet-20 list (`cate20`), in its order. Its lmms-eval task returns the F1 mean over
# `cate31` (these 20 plus 11 more, "lamp" twice, "towl" as spelled); its tables print cate8,
# cate20 and cate31.
SCANNET20_CATEGORIES = (
    "chair", "pillow", "cabinet", "table", "lamp", "couch", "desk", "stand", "bed", "backpack",
    "bathtub", "ottoman", "dresser", "bin", "toilet", "refrigerator", "stove", "microwave", "monitor", "computer",
)
TOY_CATEGORIES = tuple(scenes.CATEGORY_NAMES)  # the toy world's 8, in its order
CATEGORY_LISTS = {"scannet20": SCANNET20_CATEGORIES, "toy": TOY_CATEGORIES}


def which_category_list(records: Sequence[dict]) -> str:
    """"toy" when every ground-truth label of the detection records is a toy-world category, else
    "scannet20" (the key of CATEGORY_LISTS whose mean is the headline: see above)."""
    labels = {category(b["label"]) for r in records for b in r["boxes"]}
    return "toy" if labels <= set(TOY_CATEGORIES) else "scannet20"


def category(label: Any) -> str:
    """The category key of a label: the normalisation rewards.match_detections applies."""
    return rewards.norm_label(label)


def predicted_boxes(completion: str) -> list[dict]:
    """The valid boxes of a detection completion, read leniently; [] when it has none."""
    return rewards.parse_boxes_lenient(answer_text(completion))


def detection_counts(records: Sequence[dict], completions: Sequence[str], iou_threshold: float
                     ) -> tuple[dict[str, list[int]], int]:
    """({category: [TP, FP, FN]} summed over the records, false positives of unknown labels).

    Every ground-truth category of the evaluated records gets an entry, even if never predicted.
    A match needs IoU > iou_threshold (strictly), as in the F1 reward.
    """
    categories = sorted({category(b["label"]) for r in records for b in r["boxes"]})
    counts = {c: [0, 0, 0] for c in categories}
    other_fp = 0
    for record, completion in zip(records, completions):
        pred, gt = predicted_boxes(completion), record["boxes"]
        for c in sorted({category(b["label"]) for b in list(pred) + list(gt)}):
            tp, fp, fn = rewards.match_detections([b for b in pred if category(b["label"]) == c],
                                                  [b for b in gt if category(b["label"]) == c],
                                                  iou_threshold)
            if c in counts:
                for k, v in enumerate((tp, fp, fn)):
                    counts[c][k] += v
            else:
                other_fp += fp  # no ground truth anywhere for this label: all false positives
    return counts, other_fp


def macro_mean(per_category: dict[str, dict], categories: Sequence[str]) -> dict[str, float]:
    """Unweighted mean P, R, F1 over `categories`; one absent from `per_category` counts 0.

    Example: per-category F1 1, 1 for chair, table, and 0 for sofa: over the three present
    categories 2/3; over SCANNET20_CATEGORIES (no "sofa" there) (1 + 1) / 20 = 0.1.
    """
    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    rows = [per_category.get(c, zero) for c in categories]
    return {k: mean([m[k] for m in rows]) for k in ("precision", "recall", "f1")}


def detection_metrics_at(records: Sequence[dict], completions: Sequence[str], iou_threshold: float,
                         category_list: str | None = None) -> dict:
    """P/R/F1 per category, the macro means (present categories; VG LLM's ScanNet-20; for toy
    data the toy's 8), micro totals. The top-level precision / recall / f1 are the headline mean,
    named by "headline": "scannet20" for ScanNet data, "present" for the toy's (see above).
    `category_list` ("toy" / "scannet20"; default: which_category_list(records)) says which."""
    category_list = category_list or which_category_list(records)
    if category_list not in CATEGORY_LISTS:
        raise ValueError(f"unknown category list {category_list!r}; choose from {', '.join(CATEGORY_LISTS)}")
    counts, other_fp = detection_counts(records, completions, iou_threshold)
    per_category = {c: prf(*tp_fp_fn) for c, tp_fp_fn in counts.items()}
    tp, fp, fn = (sum(v[k] for v in counts.values()) for k in range(3))

    def fixed(categories: Sequence[str]) -> dict:
        return {**macro_mean(per_category, categories), "categories": sum(c in per_category for c in categories)}

    # unweighted means of the per-category values (so macro F1 is the mean of the category F1s,
    # not the F1 of macro P and macro R)
    present = {**macro_mean(per_category, list(per_category)), "categories": len(per_category)}
    scannet20 = fixed(SCANNET20_CATEGORIES)  # VG LLM's published rule: the mean over its fixed list
    headline = "scannet20" if category_list == "scannet20" else "present"
    out = {
        **{k: (scannet20 if headline == "scannet20" else present)[k] for k in ("precision", "recall", "f1")},
        "headline": headline,
        "present": present,
        "scannet20": scannet20,
    }
    if category_list == "toy":
        out["toy"] = fixed(TOY_CATEGORIES)  # = present whenever all 8 are in the ground truth
    return {
        **out,
        # every box pooled, unknown labels included
        "micro": prf(tp, fp + other_fp, fn),
        "per_category": per_category,
        "other_fp": other_fp,
    }


def localisation_errors(records: Sequence[dict], completions: Sequence[str]) -> dict | None:
    """Where the boxes go wrong: median absolute error per axis, in metres, of the centres and sizes.

    Each predicted box is compared with the ground-truth box of the same label whose centre is
    nearest (no IoU threshold, no one-to-one matching): a diagnostic, not a benchmark metric. It
    tells a model that knows what is there (small size errors) from one that knows where (small
    centre errors); F1@0.25 needs both. None when no predicted label occurs in the ground truth.
    {"centre": [x, y, z], "size": [dx, dy, dz], "boxes": number of predicted boxes compared}
    """
    errors = []
    for record, text in zip(records, completions):
        for pred in predicted_boxes(text):  # parse_boxes has validated these: 9 finite numbers
            p = np.asarray(pred["bbox_3d"][:6])
            # Ground-truth boxes pass the same check (rewards.valid_bbox); a malformed one is left out.
            same = [rewards.valid_bbox(b.get("bbox_3d")) for b in record["boxes"]
                    if category(b.get("label")) == category(pred["label"])]
            same = [np.asarray(g[:6]) for g in same if g is not None]
            if not same:
                continue
            nearest = min(same, key=lambda g: float(np.linalg.norm(g[:3] - p[:3])))
            errors.append(np.abs(p - nearest))
    if not errors:
        return None
    median = np.median(np.stack(errors), axis=0)
    return {"centre": median[:3].round(4).tolist(), "size": median[3:].round(4).tolist(), "boxes": len(errors)}


def detection_metrics(records: Sequence[dict], completions: Sequence[str],
                      truncated: Sequence[bool] | None = None, category_list: str | None = None) -> dict:
    """Detection metrics of a data set: {"@0.25": {...}, "@0.5": {...}} plus counts, format rate
    and (given generation's flags) the share of completions cut by the token budget.
    `category_list`: the data set's fixed category list, "toy" or "scannet20" (default: decided
    from these records' labels, which_category_list)."""
    check_lengths(records, completions, truncated)
    category_list = category_list or which_category_list(records)
    out: dict[str, Any] = {
        "num_samples": len(records),
        "format_rate": format_rate(records, completions),
        "truncated": truncated_share(truncated),
        "categories": sorted({category(b["label"]) for r in records for b in r["boxes"]}),
        "category_list": category_list,
    }
    for t in IOU_THRESHOLDS:
        out[f"@{t}"] = detection_metrics_at(records, completions, t, category_list)
    out["median_abs_error_m"] = localisation_errors(records, completions)
    return out


# =====================================================================================
# Grounding: Acc@k = share of samples with IoU >= k
# =====================================================================================
# The IoU is the grounding reward's (rewards.grounding_iou_reward): the predicted box, in the
# camera frame of the *predicted* frame f, goes to the scene by axis_align_matrix @ cam2global[f]
# and is compared exactly with the ground-truth box. A malformed answer or a frame outside the
# sampled frames has IoU 0. Note the convention: Acc counts IoU >= threshold (ScanRefer), while
# detection matching needs IoU > threshold. Answers are read leniently (answer_text,
# rewards.parse_grounding_lenient: also a fenced / plain JSON dict, or VG LLM's first line naming
# "bbox_3d").
#
# A record without a ground-truth frame (`gt_frame` None: ScanRefer val, whose VG LLM records
# have `target` null) still scores its box; it is left out of frame accuracy, which is None when
# no record has a frame. ScanRefer's "unique" / "multiple" split is reported when the records
# carry it: VG LLM's ScanRefer records as metadata.question_type (= ScanRefer's eval_type,
# vgg-llm/Point3R-LLM scripts/preprocess/convert_scanrefer.py), or an `eval_type` key.
#
# Euler convention of the answer's box (`euler`). "ZXY" (default): intrinsic Rz Rx Ry, this
# project's boxes.box_rotation, the same as VG LLM's current ScanRefer evaluation
# (vgg-llm/Point3R-LLM src/lmms_eval/tasks/scanrefer/utils.py, scanrefer_bbox_to_9dof with
# convention="ZXY", since commit 85c9cd0 of 2025-11-28, "models and data have been updated
# accordingly"). "zxy": the earlier VG LLM release (LaVi-Lab/VG-LLM 6fbdae6,
# transform_scanrefer_bbox), whose camera-frame boxes are scipy's lower-case "zxy", i.e.
# extrinsic, R = Ry(pitch) Rx(roll) Rz(yaw); it rotates them into the scene, takes the scene
# rotation's extrinsic "zxy" angles, and its IoU then reads those angles as intrinsic ZXY
# (pytorch3d euler_angles_to_matrix(.., "ZXY")), as does ours. `vgllm_box_to_scene` repeats
# that for models trained on the earlier data. The ground-truth box is read as intrinsic ZXY by
# both (ScanRefer's boxes are axis-aligned: angles 0).

GROUNDING_SUBSETS = ("unique", "multiple")
EULER_CONVENTIONS = ("ZXY", "zxy")


def grounding_subset(record: dict) -> str | None:
    """ScanRefer's "unique" / "multiple" label of a record (metadata.question_type, metadata.eval_type
    or eval_type), or None when it carries none."""
    meta = record.get("metadata")
    found = [meta.get("question_type"), meta.get("eval_type")] if isinstance(meta, dict) else []
    for value in (*found, record.get("eval_type")):
        if isinstance(value, str) and value.strip().lower() in GROUNDING_SUBSETS:
            return value.strip().lower()
    return None


def extrinsic_zxy_rotation(yaw: float, roll: float, pitch: float) -> np.ndarray:
    """scipy's Rotation.from_euler("zxy", [yaw, roll, pitch]) (extrinsic): Ry(pitch) Rx(roll) Rz(yaw).

    It is the transpose of the intrinsic ZXY rotation of the negated angles.
    """
    return box_rotation(-yaw, -roll, -pitch).T


def extrinsic_zxy_angles(R: np.ndarray) -> tuple[float, float, float]:
    """scipy's Rotation.from_matrix(R).as_euler("zxy"): the inverse of extrinsic_zxy_rotation
    (middle angle in [-pi/2, pi/2]; R is first made orthonormal, as from_matrix does)."""
    u, _, vt = np.linalg.svd(np.asarray(R, dtype=float).reshape(3, 3))
    yaw, roll, pitch = rotation_to_euler_zxy((u @ vt).T)
    return -yaw, -roll, -pitch


def vgllm_box_to_scene(box: Sequence[float], to_scene: Any, convention: str = "zxy") -> list[float]:
    """A camera-frame box mapped to the scene as VG LLM's ScanRefer evaluation maps it.

    `to_scene` is axis_align_matrix @ cam2global[frame]. The centre goes through the full matrix;
    the rotation R(angles) of the given convention ("zxy": extrinsic_zxy_rotation; "ZXY":
    boxes.box_rotation) is left-multiplied by its 3x3 part and turned back into angles of the
    same convention. The result is read by the IoU as intrinsic ZXY (boxes.box_rotation), as VG
    LLM's IoU reads it. For "ZXY" this is the rigid transform of the box (= the grounding reward).
    """
    if convention not in EULER_CONVENTIONS:
        raise ValueError(f"unknown Euler convention {convention!r}; choose from {EULER_CONVENTIONS}")
    T = np.asarray(to_scene, dtype=float).reshape(4, 4)
    b = [float(v) for v in box]
    centre = T[:3, :3] @ np.array(b[:3]) + T[:3, 3]
    if convention == "zxy":
        angles = extrinsic_zxy_angles(T[:3, :3] @ extrinsic_zxy_rotation(*b[6:9]))
    else:
        angles = rotation_to_euler_zxy(T[:3, :3] @ box_rotation(*b[6:9]))
    return [*centre.tolist(), *b[3:6], *map(float, angles)]


def predicted_grounding(completion: str) -> tuple[int, list[float]] | None:
    """(frame, box) of a grounding completion, read leniently, or None if it does not parse."""
    return rewards.parse_grounding_lenient(answer_text(completion))


def predicted_frame(completion: str) -> int | None:
    """The frame index a grounding completion names, or None if it does not parse."""
    parsed = predicted_grounding(completion)
    return None if parsed is None else parsed[0]


def grounding_iou(completion: str, record: dict, euler: str = "ZXY") -> float:
    """The 3D IoU of a grounding completion's box with the record's gt_bbox, 0 if unusable.

    "ZXY": the grounding reward on the (leniently read) answer, rewritten in the tagged form.
    "zxy": vgllm_box_to_scene then the exact IoU (a frame outside the sampled frames: 0).
    """
    parsed = predicted_grounding(completion)
    if parsed is None:
        return 0.0
    frame, box = parsed
    if euler == "ZXY":
        return rewards.grounding_iou_reward(as_tagged(json.dumps({"frame": frame, "bbox_3d": box})), record)
    if not 0 <= frame < len(record["cam2global"]):
        return 0.0
    align = np.asarray(record.get("axis_align_matrix", np.eye(4)), dtype=float).reshape(4, 4)
    to_scene = align @ np.asarray(record["cam2global"][frame], dtype=float).reshape(4, 4)
    return box3d_iou(vgllm_box_to_scene(box, to_scene, euler), record["gt_bbox"])


def accuracies(ious: Sequence[float]) -> dict[str, float]:
    """{"acc@0.25", "acc@0.5"}: the share of IoUs >= each threshold."""
    return {f"acc@{t}": mean([float(iou >= t) for iou in ious]) for t in IOU_THRESHOLDS}


def grounding_metrics(records: Sequence[dict], completions: Sequence[str],
                      truncated: Sequence[bool] | None = None, euler: str = "ZXY") -> dict:
    """Acc@0.25, Acc@0.5 (overall and per ScanRefer subset), mean IoU, frame accuracy
    (predicted frame == ground-truth frame, over the records that have one; else None)."""
    check_lengths(records, completions, truncated)
    if euler not in EULER_CONVENTIONS:
        raise ValueError(f"unknown Euler convention {euler!r}; choose from {EULER_CONVENTIONS}")
    ious = [grounding_iou(c, r, euler) for c, r in zip(completions, records)]
    framed = [(c, r) for c, r in zip(completions, records) if r.get("gt_frame") is not None]
    out: dict[str, Any] = {"num_samples": len(records), "format_rate": format_rate(records, completions),
                           "truncated": truncated_share(truncated), "euler": euler}
    out.update(accuracies(ious))
    out["mean_iou"] = mean(ious)
    out["frame_acc"] = mean([float(predicted_frame(c) == int(r["gt_frame"])) for c, r in framed]) if framed else None
    out["frame_samples"] = len(framed)
    subsets = {}
    for name in GROUNDING_SUBSETS:
        chosen = [iou for iou, r in zip(ious, records) if grounding_subset(r) == name]
        if chosen:
            subsets[name] = {"num_samples": len(chosen), **accuracies(chosen), "mean_iou": mean(chosen)}
    out["subsets"] = subsets  # {} when the records carry no subset labels
    return out


# =====================================================================================
# Spatial QA: accuracy or MRA per question type, overall = unweighted mean of the types
# =====================================================================================
# Each sample is scored as VSI-Bench scores it (vision-x-nyu/thinking-in-space
# lmms_eval/tasks/vsibench/utils.py, vsibench_process_results), on the leniently read answer
# (answer_text): the first space-separated word, trailing "." removed (fuzzy_matching); multiple
# choice: that word equals the ground truth, case-insensitive (exact_match: "A", "a", "A.",
# "A. sofa", "A sofa" score, "(A)", "A)", "A:" do not); numeric: float() of that word (to_float:
# "3.5 m" reads 3.5, "3.5m" and "three" score 0), then MRA over the ten thresholds of
# np.linspace(.5, .95, 10) with no slack (mean_relative_accuracy). Where that differs from the
# reward (rewards.parse_choice / parse_number / mra, 1e-9 slack at the thresholds), the metric
# follows VSI-Bench: e.g. 4 for 5 scores 0.6 here (|4 - 5| / 5 <= 1 - 0.8 is False in floats),
# 0.7 as a reward. Not in VSI-Bench: a ground truth of 0 (it divides by it) scores exact match.
#
# Aggregation as vsibench_aggregate_results: the mean per question type; then
# object_rel_direction_easy / _medium / _hard are replaced by one object_rel_direction score,
# the plain mean of their three means (not the mean over their records); overall = the
# unweighted mean over the types. (VSI-Bench needs all three sub-types; here the ones present
# are averaged, with a plain object_rel_direction type, if any, as one more member.)

# VSI-Bench's thresholds, built as it builds them: linspace(.5, .95, int((.95 - .5) / .05 + 2)),
# which is 10 points (the quotient is 10.999..., truncated).
VSI_MRA_THRESHOLDS = np.linspace(0.5, 0.95, int((0.95 - 0.5) / 0.05 + 2))
REL_DIRECTION = "object_rel_direction"
REL_DIRECTION_PARTS = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard")


def metric_name(question_type: str) -> str:
    """What a question type's score is: "accuracy" (multiple choice) or "mra" (numeric)."""
    if question_type in data.MC_QUESTION_TYPES:
        return "accuracy"
    if question_type in data.NUMERIC_QUESTION_TYPES:
        return "mra"
    return "score"  # an unknown type: the reward decides from the record (options / answer)


def vsi_fuzzy_matching(answer: str) -> str:
    """VSI-Bench's fuzzy_matching: the first space-separated word, trailing dots stripped."""
    return answer.split(" ")[0].rstrip(".").strip()


def vsi_to_float(text: str) -> float | None:
    """VSI-Bench's to_float: float(text), or None when that fails."""
    try:
        return float(text)
    except (TypeError, ValueError, OverflowError):
        return None


def vsi_mra(pred: float, target: float) -> float:
    """VSI-Bench's mean_relative_accuracy: mean over its 10 thresholds theta of
    |pred - target| / target <= 1 - theta, in plain floating point. target 0: exact match."""
    if target == 0:
        return 1.0 if pred == 0 else 0.0
    return float(np.mean(abs(pred - target) / target <= 1 - VSI_MRA_THRESHOLDS))


def spatial_score(completion: str, record: dict) -> float:
    """One spatial answer scored as VSI-Bench scores it (exact match or MRA), in [0, 1]."""
    answer = answer_text(completion)
    if answer is None:
        return 0.0
    pred, truth = vsi_fuzzy_matching(answer), str(record["answer"])
    qtype = record.get("question_type")
    mc = qtype in data.MC_QUESTION_TYPES or (qtype not in data.NUMERIC_QUESTION_TYPES and rewards.is_multiple_choice(record))
    if mc:
        return 1.0 if pred.lower() == truth.lower() else 0.0
    p, t = vsi_to_float(pred), vsi_to_float(truth)
    return 0.0 if p is None or t is None else vsi_mra(p, t)


def merge_rel_direction(per_type: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(per_type with the object_rel_direction sub-types merged into one type, the merged parts).

    The merged score is the plain mean of the parts' scores (VSI-Bench: (easy + medium + hard) / 3).
    Without sub-types nothing changes and the parts are {}.
    """
    if not any(t in per_type for t in REL_DIRECTION_PARTS):
        return per_type, {}
    parts = {t: m for t, m in per_type.items() if t in REL_DIRECTION_PARTS or t == REL_DIRECTION}
    merged = {"metric": "accuracy", "score": mean([m["score"] for m in parts.values()]),
              "num_samples": sum(m["num_samples"] for m in parts.values())}
    rest = {t: m for t, m in per_type.items() if t not in parts}
    return dict(sorted({**rest, REL_DIRECTION: merged}.items())), parts


def spatial_metrics(records: Sequence[dict], completions: Sequence[str],
                    truncated: Sequence[bool] | None = None) -> dict:
    """{"overall", "per_type": {type: {"metric", "score", "num_samples"}}, "rel_direction_parts"}
    plus the format rate and the truncated share."""
    check_lengths(records, completions, truncated)
    scores: dict[str, list[float]] = {}
    for record, completion in zip(records, completions):
        scores.setdefault(str(record["question_type"]), []).append(spatial_score(completion, record))
    per_type, parts = merge_rel_direction({t: {"metric": metric_name(t), "score": mean(s), "num_samples": len(s)}
                                           for t, s in sorted(scores.items())})
    return {
        "num_samples": len(records),
        "format_rate": format_rate(records, completions),
        "truncated": truncated_share(truncated),
        "overall": mean([m["score"] for m in per_type.values()]),
        "per_type": per_type,
        "rel_direction_parts": parts,  # the sub-types merged into object_rel_direction ({} if none)
    }


# =====================================================================================
# Scoring a task
# =====================================================================================

METRICS = {"detection": detection_metrics, "grounding": grounding_metrics, "spatial": spatial_metrics}


def score(task: str, records: Sequence[dict], completions: Sequence[str],
          truncated: Sequence[bool] | None = None, **options: Any) -> dict:
    """The metrics of one task from (records, completions): no model needed.

    `truncated` (one flag per completion: it hit the token budget) adds the share "truncated";
    `options` go to the task's metric function (grounding: euler="ZXY" or "zxy").
    """
    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(METRICS)}")
    return METRICS[task](records, completions, truncated, **options)


# =====================================================================================
# Generation (greedy, batched)
# =====================================================================================


def generate_completions(net, tokenizer, image_cfg, records: Sequence[dict], batch_size: int = 32,
                         max_new_tokens: int = 64, progress: bool = True) -> tuple[list[str], list[bool]]:
    """Greedy completions of the records' prompts, in order, as text (tags kept, EOS dropped), and
    for each whether it was cut by `max_new_tokens` (no EOS).

    `net` is a model.RFTModel; a DDP wrapper is unwrapped here. It is put in eval mode for the
    call and given back in the mode it came in, so training loops can call this mid-run. Call it
    on one process only; an FSDP2-sharded model must be unsharded first (`net.unshard()`), which
    is a collective, so that stays the training script's business.
    """
    net = getattr(net, "module", net)  # DistributedDataParallel keeps the model in .module
    device = next(net.parameters()).device
    # Special tokens are suppressed: a young policy samples them otherwise.
    suppress = model_lib.special_token_ids(tokenizer, net.lm.config.text_config.vocab_size)
    was_training = net.training
    net.eval()
    completions: list[str] = []
    truncated: list[bool] = []
    try:
        with torch.no_grad(), tqdm(total=len(records), unit="sample", desc="generate",
                                   disable=not progress, file=sys.stderr) as bar:
            for start in range(0, len(records), batch_size):
                chunk = records[start:start + batch_size]
                batch = data.to_device(data.collate(chunk, tokenizer, image_cfg, with_answer=False), device)
                new_ids = net.generate(batch, max_new_tokens=max_new_tokens, do_sample=False,
                                       suppress_tokens=suppress)
                # skip_special_tokens drops EOS and padding; <think>/<answer> are ordinary tokens
                completions.extend(tokenizer.batch_decode(new_ids, skip_special_tokens=True))
                truncated.extend((~(new_ids == tokenizer.eos_token_id).any(1)).tolist())
                bar.update(len(chunk))
    finally:
        net.train(was_training)
    return completions, truncated


# =====================================================================================
# evaluate(): records -> completions -> metrics (the function the training scripts call)
# =====================================================================================


def select_records(records: Sequence[dict], limit: int | None, seed: int) -> list[dict]:
    """A seeded random subset of `limit` records, kept in file order (all records if no limit).

    Different seeds give different subsets ("evaluation seeds"); the same seed always the same.
    """
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in chosen]


def load_eval_records(data_dir: str, split: str, task: str, limit: int | None, seed: int,
                      record_options: dict | None = None) -> list[dict]:
    """The records of one task and split (runtime.load_task_records), subset by (limit, seed).

    `data_dir` is a data folder (`<split>/<task>.jsonl`) or one published records file (VG LLM's
    JSON array, VSI-Bench rows). `record_options`: media_root, num_frames, skip_bad
    (runtime.record_options: the scripts' --media-root, --num-frames, --skip-bad).
    """
    return select_records(runtime.load_task_records(data_dir, task, split, **(record_options or {})), limit, seed)


def evaluate(net, tokenizer, image_cfg, data_dir: str, split: str = "val",
             tasks: Sequence[str] = ("detection",), limit: int | None = None, seed: int = 0,
             batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = True,
             samples: int = 3, record_options: dict | None = None, max_seq_len: int | None = None) -> dict:
    """Greedy evaluation on `data_dir/split/<task>.jsonl` for each task.

    Returns {"meta": {...settings, seconds...}, task: metrics, ...} where each task's metrics
    (see detection_metrics / grounding_metrics / spatial_metrics) also hold `samples` example
    completions next to their references. All values are plain Python: `json.dump` works.
    `max_new_tokens=None` uses the task's default for this model (data.max_new_tokens: the toy's,
    or the published budget + the answer tags for a real tokenizer). With `max_seq_len` the
    records are first checked to fit it with that budget (runtime.fit_lengths; with
    record_options' skip_bad the others are left out). Detection scores its headline over the
    fixed category list of the whole records file (which_category_list), also under --limit.
    """
    start = time.time()
    results: dict[str, Any] = {"meta": {"data": data_dir, "split": split, "tasks": list(tasks), "limit": limit,
                                        "seed": seed, "decoding": "greedy"}}
    real = not model_lib.is_toy_tokenizer(tokenizer)
    for task in tasks:
        every = runtime.load_task_records(data_dir, task, split, **(record_options or {}))
        records = select_records(every, limit, seed)
        n_tokens = data.max_new_tokens(task, real) if max_new_tokens is None else max_new_tokens
        if max_seq_len is not None:  # a prompt longer than the context is refused before generating
            records = runtime.fit_lengths(records, tokenizer, image_cfg, max_seq_len, n_tokens,
                                          skip_bad=bool((record_options or {}).get("skip_bad")))
        completions, truncated = generate_completions(net, tokenizer, image_cfg, records, batch_size, n_tokens,
                                                      progress)
        # `truncated`: a cut answer scores 0, so its share says whether --max-new-tokens is too small.
        options = {"category_list": which_category_list(every)} if task == "detection" else {}
        metrics = score(task, records, completions, truncated, **options)
        metrics["max_new_tokens"] = n_tokens
        metrics["samples"] = [
            {"id": r.get("id"), "completion": c, "reference": r["conversations"][1]["value"]}
            for r, c in list(zip(records, completions))[:samples]
        ]
        results[task] = metrics
    results["meta"]["seconds"] = round(time.time() - start, 2)
    return results


# =====================================================================================
# Tables
# =====================================================================================
# A results dict is flattened to its headline numbers ("task/metric" -> fraction), the ones the
# paper's tables show; tables print them in percent with one decimal, like the paper.


def summary(results: dict) -> dict[str, float]:
    """Headline numbers of a results dict, in table order (fractions in [0, 1]).

    Also handy for training logs: `logger.log({"step": s, **eval.summary(results)})`.
    """
    rows: dict[str, float] = {}
    if "detection" in results:
        m = results["detection"]
        for t in IOU_THRESHOLDS:  # the headline: the mean over the data set's fixed list (see detection)
            rows[f"detection/F1@{t}"] = m[f"@{t}"]["f1"]
            rows[f"detection/P@{t}"] = m[f"@{t}"]["precision"]
            rows[f"detection/R@{t}"] = m[f"@{t}"]["recall"]
        for t in IOU_THRESHOLDS:  # ScanNet data: the present-category mean beside its ScanNet-20 headline
            if m[f"@{t}"].get("headline", "present") != "present":  # (results saved before: present)
                for key, name in (("f1", "F1"), ("precision", "P"), ("recall", "R")):
                    rows[f"detection/{name}@{t} present"] = m[f"@{t}"]["present"][key]
        for t in IOU_THRESHOLDS:  # VG LLM's rule: the mean over its fixed ScanNet-20 list
            if "scannet20" in m[f"@{t}"]:  # (absent from results saved before it existed)
                for key, name in (("f1", "F1"), ("precision", "P"), ("recall", "R")):
                    rows[f"detection/{name}@{t} ScanNet-20"] = m[f"@{t}"]["scannet20"][key]
        rows["detection/format"] = m["format_rate"]
        if m.get("truncated") is not None:  # the share cut by the token budget, when generation told
            rows["detection/truncated"] = m["truncated"]
    if "grounding" in results:
        m = results["grounding"]
        for t in IOU_THRESHOLDS:
            rows[f"grounding/Acc@{t}"] = m[f"acc@{t}"]
        for subset, v in (m.get("subsets") or {}).items():
            for t in IOU_THRESHOLDS:
                rows[f"grounding/Acc@{t} {subset}"] = v[f"acc@{t}"]
        rows["grounding/mean IoU"] = m["mean_iou"]
        if m.get("frame_acc") is not None:  # None: no record has a ground-truth frame
            rows["grounding/frame acc"] = m["frame_acc"]
        rows["grounding/format"] = m["format_rate"]
        if m.get("truncated") is not None:  # the share cut by the token budget, when generation told
            rows["grounding/truncated"] = m["truncated"]
    if "spatial" in results:
        m = results["spatial"]
        rows["spatial/overall"] = m["overall"]
        for t, v in m["per_type"].items():
            rows[f"spatial/{t} ({v['metric']})"] = v["score"]
        rows["spatial/format"] = m["format_rate"]
        if m.get("truncated") is not None:  # the share cut by the token budget, when generation told
            rows["spatial/truncated"] = m["truncated"]
    return rows


def percent(value: float | None) -> str:
    """0.437 -> "43.7"; a missing value -> "-"."""
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_table(results: dict, per_category: bool = True) -> str:
    """The headline numbers as a Markdown table (percent), then the detection categories."""
    lines = ["| task | metric | value |", "| --- | --- | ---: |"]
    for key, value in summary(results).items():
        task, metric = key.split("/", 1)
        lines.append(f"| {task} | {metric} | {percent(value)} |")
    counts = [f"{t} {results[t]['num_samples']}" for t in data.TASKS if t in results]
    lines += ["", "samples: " + ", ".join(counts)]
    if per_category and "detection" in results:
        t = IOU_THRESHOLDS[0]
        m = results["detection"][f"@{t}"]
        lines += ["", f"| category (IoU > {t}) | TP | FP | FN | P | R | F1 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for c, v in m["per_category"].items():
            lines.append(f"| {c} | {v['tp']} | {v['fp']} | {v['fn']} | {percent(v['precision'])} "
                         f"| {percent(v['recall'])} | {percent(v['f1'])} |")
        lines.append(f"| (other labels) | - | {m['other_fp']} | - | - | - | - |")
    return "\n".join(lines)


def compare_table(a: dict, b: dict, names: Sequence[str] = ("A", "B"), more: Sequence[dict] = ()) -> str:
    """Results side by side (percent), with a delta column per result against the first one.

    `more` adds further results after `b` (then `names` names all of them). A metric missing
    from a result shows "-" and has no delta. Deltas are in percentage points.
    """
    all_results = [a, b, *more]
    if len(names) != len(all_results):
        raise ValueError(f"{len(all_results)} results but {len(names)} names")
    rows = [summary(r) for r in all_results]
    keys = list(dict.fromkeys(k for row in rows for k in row))  # union, in first-seen order
    header = ["metric", *names, *(f"Δ {n} − {names[0]}" for n in names[1:])]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for key in keys:
        values = [row.get(key) for row in rows]
        deltas = ["-" if v is None or values[0] is None else f"{100 * (v - values[0]):+.1f}" for v in values[1:]]
        lines.append("| " + " | ".join([key, *(percent(v) for v in values), *deltas]) + " |")
    return "\n".join(lines)


# =====================================================================================
# Command line
# =====================================================================================


def load_results(path: str) -> dict:
    """A results JSON written by --out; a one-line error if it is missing or not JSON."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"results file not found: {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise data.RecordError(f"{path}: not a results JSON file ({e.msg})") from None


def run_compare(args: argparse.Namespace) -> None:
    """--compare: print saved results side by side."""
    if len(args.compare) < 2:
        raise SystemExit("error: --compare needs at least two results files")
    results = [load_results(p) for p in args.compare]
    names = (args.names.split(",") if args.names
             else [os.path.splitext(os.path.basename(p))[0] for p in args.compare])
    if len(names) != len(results):
        raise SystemExit(f"error: {len(results)} results files but {len(names)} --names")
    print(compare_table(results[0], results[1], names, more=results[2:]))


def check_output_file(path: str) -> None:
    """A one-line error now, rather than after the evaluation, when --out cannot be written."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"error: --out {path} is a folder; give a file name, e.g. {os.path.join(path, 'eval.json')}")
    blocker = parent
    while not os.path.exists(blocker):  # the folders that would be made must not pass through a file
        blocker = os.path.dirname(blocker)
    if not os.path.isdir(blocker):
        raise SystemExit(f"error: --out {path}: {blocker} is a file, not a folder")


def output_files(out: str | None, seeds: Sequence[int]) -> list[str | None]:
    """--out per evaluation seed: "{seed}" in the name is replaced; several seeds need it.

    Example: ("runs/x/eval_seed{seed}.json", [0, 1]) -> ["runs/x/eval_seed0.json", "runs/x/eval_seed1.json"].
    """
    if out is None:
        return [None] * len(seeds)
    if len(seeds) > 1 and "{seed}" not in out:
        raise SystemExit(f"error: --out {out} is one file for {len(seeds)} seeds; put {{seed}} in its name, "
                         f"e.g. {out.removesuffix('.json')}_seed{{seed}}.json")
    return [out.replace("{seed}", str(seed)) for seed in seeds]


def run_eval(args: argparse.Namespace) -> None:
    """Evaluate one model on each evaluation seed: load once, generate, score, print, save the JSON."""
    # Check the data, the device and the output paths first: a typo in any should not cost a
    # model load (nor, for --out, a whole evaluation).
    options = runtime.record_options(args)
    for task in args.tasks:
        for seed in args.seed:
            load_eval_records(args.data, args.split, task, args.limit, seed, options)
    device = runtime.resolve_device(args.device)
    outs = output_files(args.out, args.seed)
    for out in outs:
        if out:
            check_output_file(out)
    geometry, geometry_dim = runtime.geometry_arguments(args)
    net, tokenizer, image_cfg = model_lib.load_model(args.model, geometry=geometry, geometry_dim=geometry_dim,
                                                     dtype=runtime.weights_dtype(args, training=False))
    net.to(device)
    image_cfg = runtime.pixel_budget(image_cfg, args)
    for seed, out in zip(args.seed, outs):
        results = evaluate(net, tokenizer, image_cfg, args.data, args.split, args.tasks, args.limit, seed,
                           args.batch_size, args.max_new_tokens, progress=not args.no_progress, samples=args.samples,
                           record_options=options, max_seq_len=runtime.max_seq_len(args, net))
        results["meta"]["model"] = args.model
        if len(args.seed) > 1:
            print(f"evaluation seed {seed}:")
        print(markdown_table(results))
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1)
            print(f"\nwrote {out}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.compare:
        runtime.check_model_arguments(parser, args, args.model)  # --geometry / --geometry-dim
    try:
        if args.compare:
            run_compare(args)
        else:
            run_eval(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # RecordError is a ValueError
        # a missing checkpoint / data folder / results file is a one-line message, not a traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
