"""Evaluation: the paper's protocol (greedy decoding, then the benchmark metrics) and its tables.

3D-RFT reports every number after *greedy* decoding of the fine-tuned model, with the metrics
that the RL rewards are built from (docs/DESIGN.md, "Evaluation"):

    detection   per-category greedy matching at IoU > 0.25 and IoU > 0.5, TP/FP/FN summed over the
                dataset per category, P/R/F1 per category, the macro mean over categories
                (ScanNet detection; paper: F1@0.25 43.7, P 54.2, R 38.2 for 3D-RFT-4B)
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

import numpy as np
import torch
from tqdm import tqdm

import data
import model as model_lib
import rewards
import runtime

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
    p.add_argument("--geometry", default="auto", choices=tuple(model_lib.GEOMETRY_FLAG),  # auto = as saved
                   help="geometry prior: as the checkpoint has it (auto), forced on, or dropped (off)")
    p.add_argument("--data", default="data/toy",  # the synthetic world's output folder (scenes.py)
                   help="data folder holding <split>/<task>.jsonl")
    p.add_argument("--split", default="val",  # held-out rooms
                   help="split folder inside --data")
    p.add_argument("--tasks", default="detection", type=parse_tasks,  # comma-separated
                   help=f"comma-separated tasks out of {','.join(data.TASKS)}")
    p.add_argument("--limit", default=None, type=runtime.int_at_least(1),  # None = every record of the split
                   help="evaluate a random subset of this many records per task (all if not given)")
    p.add_argument("--seed", default=0, type=int,  # the "evaluation seed": which subset --limit takes
                   help="seed of the random subset chosen by --limit (decoding is greedy, so it is "
                        "the only randomness)")
    # how to run
    p.add_argument("--batch-size", default=32, type=runtime.int_at_least(1),  # prompts decoded together
                   help="prompts per generate() call")
    p.add_argument("--max-new-tokens", default=None, type=runtime.int_at_least(1),  # None = data.DEFAULT_MAX_NEW_TOKENS
                   help="completion length limit (default per task: "
                        + ", ".join(f"{k} {v}" for k, v in data.DEFAULT_MAX_NEW_TOKENS.items()) + ")")
    p.add_argument("--device", default="auto",  # auto = cuda when available, else cpu
                   help="torch device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),  # fp32 on CPU
                   help="model weights dtype")
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
    """The text inside <answer>..</answer> of a well-formed completion, else None (scores 0)."""
    return rewards.parse_completion(completion)[1]


def format_rate(records: Sequence[dict], completions: Sequence[str]) -> float:
    """Share of completions whose format reward is 1 (tags right, answer parses for the task)."""
    return mean([float(rewards.format_reward(c, r) == 1.0) for c, r in zip(completions, records)])


def check_lengths(records: Sequence[dict], completions: Sequence[str]) -> None:
    """One completion per record, or the scores would silently pair the wrong ones."""
    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")


# =====================================================================================
# Detection: per-category greedy matching, TP/FP/FN summed over the dataset
# =====================================================================================
# Which categories count: those present in the ground truth of the evaluated records (as in
# the ScanNet benchmark, where the category list is fixed by the annotations). A category that
# is in the ground truth but never predicted scores P = R = F1 = 0 and *does* pull the macro mean
# down. A predicted label that appears in no ground truth box can never be right: its boxes are
# counted as false positives in a separate "other" bucket, reported (and included in the micro
# totals) but not in the macro mean, which averages over ground-truth categories only.
# Labels are compared as rewards.match_detections compares them: stripped and lower-cased.
#
# A completion that does not parse (wrong tags, bad JSON, an invalid box) predicts nothing: all
# its ground-truth boxes are false negatives. Since matching is same-label only, matching each
# category separately gives exactly the counts of matching the whole lists at once.


def category(label: Any) -> str:
    """The category key of a label: the normalisation rewards.match_detections applies."""
    return rewards.norm_label(label)


def predicted_boxes(completion: str) -> list[dict]:
    """The boxes of a detection completion; [] when it is malformed (it then only misses boxes)."""
    answer = answer_text(completion)
    boxes = rewards.parse_boxes(answer) if answer is not None else None
    return boxes or []


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


def detection_metrics_at(records: Sequence[dict], completions: Sequence[str], iou_threshold: float) -> dict:
    """P/R/F1 per category, their macro mean (over ground-truth categories), micro totals."""
    counts, other_fp = detection_counts(records, completions, iou_threshold)
    per_category = {c: prf(*tp_fp_fn) for c, tp_fp_fn in counts.items()}
    tp, fp, fn = (sum(v[k] for v in counts.values()) for k in range(3))
    return {
        # the published numbers: unweighted means of the per-category values (so macro F1 is the
        # mean of the category F1s, not the F1 of macro P and macro R)
        "precision": mean([m["precision"] for m in per_category.values()]),
        "recall": mean([m["recall"] for m in per_category.values()]),
        "f1": mean([m["f1"] for m in per_category.values()]),
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


def detection_metrics(records: Sequence[dict], completions: Sequence[str]) -> dict:
    """Detection metrics of a data set: {"@0.25": {...}, "@0.5": {...}} plus counts and format rate."""
    check_lengths(records, completions)
    out: dict[str, Any] = {
        "num_samples": len(records),
        "format_rate": format_rate(records, completions),
        "categories": sorted({category(b["label"]) for r in records for b in r["boxes"]}),
    }
    for t in IOU_THRESHOLDS:
        out[f"@{t}"] = detection_metrics_at(records, completions, t)
    out["median_abs_error_m"] = localisation_errors(records, completions)
    return out


# =====================================================================================
# Grounding: Acc@k = share of samples with IoU >= k
# =====================================================================================
# The IoU is the grounding reward's (rewards.grounding_iou_reward): the predicted box, in the
# camera frame of the *predicted* frame f, goes to the scene by axis_align_matrix @ cam2global[f]
# and is compared exactly with the ground-truth box. A malformed answer or a frame outside the
# sampled frames has IoU 0. Note the convention: Acc counts IoU >= threshold (ScanRefer), while
# detection matching needs IoU > threshold.


def predicted_frame(completion: str) -> int | None:
    """The frame index a grounding completion names, or None if it does not parse."""
    answer = answer_text(completion)
    parsed = rewards.parse_grounding(answer) if answer is not None else None
    return None if parsed is None else parsed[0]


def grounding_metrics(records: Sequence[dict], completions: Sequence[str]) -> dict:
    """Acc@0.25, Acc@0.5, mean IoU, frame accuracy (predicted frame == ground-truth frame)."""
    check_lengths(records, completions)
    ious = [rewards.grounding_iou_reward(c, r) for c, r in zip(completions, records)]
    frames_right = [float(predicted_frame(c) == int(r["gt_frame"])) for c, r in zip(completions, records)]
    out: dict[str, Any] = {"num_samples": len(records), "format_rate": format_rate(records, completions)}
    for t in IOU_THRESHOLDS:
        out[f"acc@{t}"] = mean([float(iou >= t) for iou in ious])
    out["mean_iou"] = mean(ious)
    out["frame_acc"] = mean(frames_right)
    return out


# =====================================================================================
# Spatial QA: accuracy or MRA per question type, overall = unweighted mean of the types
# =====================================================================================
# Each sample is scored by the spatial reward itself (option letter exact match for the
# multiple-choice types, MRA for the numeric ones; a malformed answer scores 0). Types are
# averaged without weights, as VSI-Bench averages its tasks, so a rare type counts as much as a
# frequent one.


def metric_name(question_type: str) -> str:
    """What a question type's score is: "accuracy" (multiple choice) or "mra" (numeric)."""
    if question_type in data.MC_QUESTION_TYPES:
        return "accuracy"
    if question_type in data.NUMERIC_QUESTION_TYPES:
        return "mra"
    return "score"  # an unknown type: the reward decides from the record (options / answer)


def spatial_metrics(records: Sequence[dict], completions: Sequence[str]) -> dict:
    """{"overall", "per_type": {type: {"metric", "score", "num_samples"}}} plus the format rate."""
    check_lengths(records, completions)
    scores: dict[str, list[float]] = {}
    for record, completion in zip(records, completions):
        scores.setdefault(str(record["question_type"]), []).append(rewards.spatial_reward(completion, record))
    per_type = {t: {"metric": metric_name(t), "score": mean(s), "num_samples": len(s)}
                for t, s in sorted(scores.items())}
    return {
        "num_samples": len(records),
        "format_rate": format_rate(records, completions),
        "overall": mean([m["score"] for m in per_type.values()]),
        "per_type": per_type,
    }


# =====================================================================================
# Scoring a task
# =====================================================================================

METRICS = {"detection": detection_metrics, "grounding": grounding_metrics, "spatial": spatial_metrics}


def score(task: str, records: Sequence[dict], completions: Sequence[str]) -> dict:
    """The metrics of one task from (records, completions): no model needed."""
    if task not in METRICS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(METRICS)}")
    return METRICS[task](records, completions)


# =====================================================================================
# Generation (greedy, batched)
# =====================================================================================


def generate_completions(net, tokenizer, image_cfg, records: Sequence[dict], batch_size: int = 32,
                         max_new_tokens: int = 64, progress: bool = True) -> list[str]:
    """Greedy completions of the records' prompts, in order, as text (tags kept, EOS dropped).

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
                bar.update(len(chunk))
    finally:
        net.train(was_training)
    return completions


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


def load_eval_records(data_dir: str, split: str, task: str, limit: int | None, seed: int) -> list[dict]:
    """The records of one task and split, subset by (limit, seed); FileNotFoundError if absent."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory not found: {data_dir} (generate the toy data with: python scenes.py)")
    # the file path (not the split folder) so that a missing file is named in the error
    records = data.load_records(os.path.join(data_dir, split, f"{task}.jsonl"))
    return select_records(records, limit, seed)


def evaluate(net, tokenizer, image_cfg, data_dir: str, split: str = "val",
             tasks: Sequence[str] = ("detection",), limit: int | None = None, seed: int = 0,
             batch_size: int = 32, max_new_tokens: int | None = None, progress: bool = True,
             samples: int = 3) -> dict:
    """Greedy evaluation on `data_dir/split/<task>.jsonl` for each task.

    Returns {"meta": {...settings, seconds...}, task: metrics, ...} where each task's metrics
    (see detection_metrics / grounding_metrics / spatial_metrics) also hold `samples` example
    completions next to their references. All values are plain Python: `json.dump` works.
    `max_new_tokens=None` uses data.DEFAULT_MAX_NEW_TOKENS[task].
    """
    start = time.time()
    results: dict[str, Any] = {"meta": {"data": data_dir, "split": split, "tasks": list(tasks), "limit": limit,
                                        "seed": seed, "decoding": "greedy"}}
    for task in tasks:
        records = load_eval_records(data_dir, split, task, limit, seed)
        n_tokens = data.DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
        completions = generate_completions(net, tokenizer, image_cfg, records, batch_size, n_tokens, progress)
        metrics = score(task, records, completions)
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
        for t in IOU_THRESHOLDS:
            rows[f"detection/F1@{t}"] = m[f"@{t}"]["f1"]
            rows[f"detection/P@{t}"] = m[f"@{t}"]["precision"]
            rows[f"detection/R@{t}"] = m[f"@{t}"]["recall"]
        rows["detection/format"] = m["format_rate"]
    if "grounding" in results:
        m = results["grounding"]
        for t in IOU_THRESHOLDS:
            rows[f"grounding/Acc@{t}"] = m[f"acc@{t}"]
        rows["grounding/mean IoU"] = m["mean_iou"]
        rows["grounding/frame acc"] = m["frame_acc"]
        rows["grounding/format"] = m["format_rate"]
    if "spatial" in results:
        m = results["spatial"]
        rows["spatial/overall"] = m["overall"]
        for t, v in m["per_type"].items():
            rows[f"spatial/{t} ({v['metric']})"] = v["score"]
        rows["spatial/format"] = m["format_rate"]
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


def run_eval(args: argparse.Namespace) -> None:
    """Evaluate one model: load, generate, score, print the table, save the JSON."""
    # Check the data, the device and the output path first: a typo in any should not cost a
    # model load (nor, for --out, a whole evaluation).
    for task in args.tasks:
        load_eval_records(args.data, args.split, task, args.limit, args.seed)
    device = runtime.resolve_device(args.device)
    if args.out:
        check_output_file(args.out)
    geometry = model_lib.GEOMETRY_FLAG[args.geometry]
    net, tokenizer, image_cfg = model_lib.load_model(args.model, geometry=geometry, dtype=getattr(torch, args.dtype))
    net.to(device)
    results = evaluate(net, tokenizer, image_cfg, args.data, args.split, args.tasks, args.limit, args.seed,
                       args.batch_size, args.max_new_tokens, progress=not args.no_progress, samples=args.samples)
    results["meta"]["model"] = args.model
    print(markdown_table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
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
