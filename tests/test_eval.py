"""Tests of eval.py: the benchmark metrics on hand-built predictions, tables, the CLI, one tiny run.

The boxes are chosen so that every IoU is exact in floating point: a box nested in another has
IoU = small volume / large volume (e.g. a unit cube inside a 2 x 1 x 1 box: exactly 0.5; inside a
4 x 1 x 1 box: exactly 0.25), which lets the tests pin the threshold conventions:
detection matching needs IoU > t (strict), grounding accuracy counts IoU >= t.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import boxes
import eval as ev
import rewards
from tests.test_model_data import make_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def box(x, y, z, dx=1.0, dy=1.0, dz=1.0):
    """An axis-aligned 9-number box."""
    return [x, y, z, dx, dy, dz, 0.0, 0.0, 0.0]


def completion(answer) -> str:
    """A well-formed completion around `answer` (JSON-encoded unless it is a string)."""
    text = answer if isinstance(answer, str) else json.dumps(answer)
    return f"<think></think><answer>{text}</answer>"


# ----------------------------------------------------------------------------- detection

C1, C2, C3, C4 = box(0, 0, 2), box(3, 0, 2), box(0, 0, 3), box(5, 0, 5)
T1 = box(0, 0, 5, dx=2.0)


def detection_case():
    """3 records, ground-truth categories {chair, table}; table is never predicted."""
    records = [
        {"task": "detection", "boxes": [{"label": "chair", "bbox_3d": C1}, {"label": "chair", "bbox_3d": C2},
                                        {"label": "table", "bbox_3d": T1}]},
        {"task": "detection", "boxes": [{"label": "chair", "bbox_3d": C3}]},
        {"task": "detection", "boxes": [{"label": "chair", "bbox_3d": C4}]},
    ]
    completions = [
        completion([
            {"label": "Chair", "bbox_3d": C1},                   # exact hit (label normalised)
            {"label": "chair", "bbox_3d": C1},                   # duplicate: FP
            {"label": "sofa", "bbox_3d": T1},                    # wrong label, no GT sofa: "other" FP
            {"label": "chair", "bbox_3d": box(3, 0, 2, dx=2.0)},  # IoU exactly 0.5 with C2
        ]),
        completion([{"label": "chair", "bbox_3d": box(0, 0, 3, dx=4.0)}]),  # IoU exactly 0.25 with C3
        "<think></think><answer>[{'label': 'chair', 'bbox_3d': [1, 2]}]</answer>",  # invalid box
    ]
    return records, completions


def test_the_exact_iou_edges_are_exact():
    assert boxes.box3d_iou(box(3, 0, 2, dx=2.0), C2) == 0.5
    assert boxes.box3d_iou(box(0, 0, 3, dx=4.0), C3) == 0.25


def test_detection_metrics_by_hand():
    records, completions = detection_case()
    m = ev.detection_metrics(records, completions)
    assert m["num_samples"] == 3 and m["categories"] == ["chair", "table"]
    assert m["format_rate"] == pytest.approx(2 / 3)  # the invalid box makes record 3 malformed

    # IoU > 0.25: chair TP = C1 + the 0.5 box; FP = duplicate + the 0.25 box (not > 0.25);
    # FN = C3 + C4 (malformed completion predicts nothing). table: never predicted, 1 FN.
    at = m["@0.25"]
    assert at["per_category"]["chair"] == {"tp": 2, "fp": 2, "fn": 2, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert at["per_category"]["table"] == {"tp": 0, "fp": 0, "fn": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert at["other_fp"] == 1
    assert (at["precision"], at["recall"], at["f1"]) == (0.25, 0.25, 0.25)  # macro over {chair, table}
    assert at["micro"] == {"tp": 2, "fp": 3, "fn": 3, "precision": 0.4, "recall": 0.4, "f1": 0.4}

    # IoU > 0.5: the box with IoU exactly 0.5 no longer matches, so C2 is missed too.
    at = m["@0.5"]
    assert at["per_category"]["chair"] == {"tp": 1, "fp": 3, "fn": 3, "precision": 0.25, "recall": 0.25, "f1": 0.25}
    assert (at["precision"], at["recall"], at["f1"]) == (0.125, 0.125, 0.125)
    json.dumps(m)  # plain Python values only


def test_localisation_errors_by_hand():
    """Per-axis median errors against the nearest same-label box; other labels and bad text skipped."""
    gt = [{"label": "chair", "bbox_3d": box(0, 0, 2)}, {"label": "chair", "bbox_3d": box(3, 0, 2)},
          {"label": "bed", "bbox_3d": box(0, 1, 4, dx=2.0)}]
    records = [{"task": "detection", "boxes": gt}] * 3
    completions = [
        completion([{"label": "chair", "bbox_3d": box(2.5, 0, 2.5, dy=1.5)},   # nearest chair: (3, 0, 2)
                    {"label": "lamp", "bbox_3d": box(0, 0, 2)}]),              # no lamp in the ground truth
        completion([{"label": "Bed", "bbox_3d": box(0, 1.25, 4, dx=1.0)}]),   # labels compare lower-cased
        "<answer>not json</answer>",
    ]
    m = ev.localisation_errors(records, completions)
    # errors: chair |(-0.5, 0, 0.5)|, sizes (0, 0.5, 0); bed (0, 0.25, 0), sizes (1, 0, 0): median of 2 = mean
    assert m == {"centre": [0.25, 0.125, 0.25], "size": [0.5, 0.25, 0.0], "boxes": 2}
    assert ev.localisation_errors(records[:1], ["<answer>[]</answer>"]) is None
    broken = [{"task": "detection", "boxes": [{"label": "chair", "bbox_3d": None},
                                              {"label": "chair", "bbox_3d": [1, 2, 3]}] + gt[:1]}]
    assert ev.localisation_errors(broken, completions[:1])["boxes"] == 1  # malformed ground truth skipped


def test_per_category_counts_equal_whole_list_matching():
    """Same-label matching: splitting by category changes nothing (micro = whole-list counts)."""
    records, completions = detection_case()
    for t in ev.IOU_THRESHOLDS:
        totals = np.zeros(3, int)
        for r, c in zip(records, completions):
            totals += rewards.match_detections(ev.predicted_boxes(c), r["boxes"], t)
        micro = ev.detection_metrics_at(records, completions, t)["micro"]
        assert [micro["tp"], micro["fp"], micro["fn"]] == totals.tolist()


def test_empty_answers_and_empty_ground_truth():
    records = [{"task": "detection", "boxes": []}, {"task": "detection", "boxes": [{"label": "bed", "bbox_3d": C1}]}]
    m = ev.detection_metrics(records, [completion([]), completion([])])
    assert m["format_rate"] == 1.0  # an empty list is a valid detection answer
    assert m["@0.25"]["per_category"] == {"bed": {"tp": 0, "fp": 0, "fn": 1, "precision": 0.0, "recall": 0.0,
                                                  "f1": 0.0}}
    assert m["@0.25"]["f1"] == 0.0
    # no ground-truth category at all: the macro mean over nothing is 0, not a crash
    assert ev.detection_metrics(records[:1], [completion([])])["@0.25"]["f1"] == 0.0


# ----------------------------------------------------------------------------- grounding

def rigid(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T.tolist()


def test_grounding_metrics_by_hand():
    # Frame 1's camera is rotated 90 degrees about y and moved; the scene is shifted by +1 in x.
    R_y90 = [[0, 0, 1], [0, 1, 0], [-1, 0, 0]]
    posed = {"task": "grounding", "gt_frame": 1, "axis_align_matrix": rigid(np.eye(3), [1, 0, 0]),
             "cam2global": [rigid(np.eye(3), [0, 0, 0]), rigid(R_y90, [2, 0, 1]), rigid(np.eye(3), [0, 0, 0])],
             # the camera box [0.5, 0, 0, 2, 1, 1] of frame 1, mapped to the scene by hand
             "gt_bbox": box(3, 0, 0.5, dz=2.0)}
    identity = {"task": "grounding", "gt_frame": 0, "axis_align_matrix": np.eye(4).tolist(),
                "cam2global": [np.eye(4).tolist()] * 3, "gt_bbox": box(0, 0, 3)}
    in_camera = box(0.5, 0, 0, dx=2.0)
    records = [posed, posed, identity, identity, identity, identity]
    completions = [
        completion({"frame": 1, "bbox_3d": in_camera}),             # IoU 1 after the transform
        completion({"frame": 0, "bbox_3d": in_camera}),             # wrong frame's pose: disjoint, IoU 0
        completion({"frame": 0, "bbox_3d": box(0, 0, 3, dx=4.0)}),  # IoU exactly 0.25
        completion({"frame": 0, "bbox_3d": box(0, 0, 3, dx=2.0)}),  # IoU exactly 0.5
        completion({"frame": 7, "bbox_3d": box(0, 0, 3)}),          # frame out of range: IoU 0
        "<answer>{'frame': 0}</answer>",                             # malformed: IoU 0
    ]
    assert rewards.grounding_iou_reward(completions[0], posed) == pytest.approx(1.0)
    m = ev.grounding_metrics(records, completions)
    assert m["acc@0.25"] == pytest.approx(3 / 6)  # IoU >= 0.25: samples 0, 2, 3
    assert m["acc@0.5"] == pytest.approx(2 / 6)   # IoU >= 0.5: samples 0, 3
    assert m["mean_iou"] == pytest.approx((1 + 0.25 + 0.5) / 6)
    assert m["frame_acc"] == pytest.approx(3 / 6)
    assert m["format_rate"] == pytest.approx(5 / 6)  # frame 7 parses; the range is a scoring matter
    assert m["num_samples"] == 6


# ----------------------------------------------------------------------------- spatial

def test_spatial_metrics_by_hand():
    def rec(qtype, answer):
        return {"task": "spatial", "question_type": qtype, "answer": answer}

    records = [rec("object_counting", "4"), rec("object_counting", "4"),
               rec("object_rel_direction", "B"), rec("object_rel_direction", "B"), rec("object_rel_direction", "B"),
               rec("room_size_estimation", "20")]
    completions = [completion("4"),      # exact: MRA 1
                   completion("3"),      # relative error 0.25: inside 6 of the 10 tolerances -> 0.6
                   completion("B"), completion("A"),
                   "<think></think><answer>B",  # malformed: format-invalid, scores 0
                   completion("no idea")]       # not a number: format-invalid, scores 0
    m = ev.spatial_metrics(records, completions)
    per = m["per_type"]
    assert per["object_counting"] == {"metric": "mra", "score": pytest.approx(0.8), "num_samples": 2}
    assert per["object_rel_direction"] == {"metric": "accuracy", "score": pytest.approx(1 / 3), "num_samples": 3}
    assert per["room_size_estimation"]["score"] == 0.0
    assert m["overall"] == pytest.approx((0.8 + 1 / 3 + 0.0) / 3)  # unweighted over types, not samples
    assert m["format_rate"] == pytest.approx(4 / 6)


def test_score_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="2 records but 1 completions"):
        ev.score("spatial", [{}, {}], ["x"])
    with pytest.raises(ValueError, match="unknown task"):
        ev.score("captioning", [], [])


# ----------------------------------------------------------------------------- subsets, tables

def test_seeded_subsets():
    records = [{"id": i} for i in range(20)]
    a, b = ev.select_records(records, 5, seed=0), ev.select_records(records, 5, seed=0)
    assert a == b and len(a) == 5
    assert [r["id"] for r in a] == sorted(r["id"] for r in a)  # file order kept
    assert ev.select_records(records, 5, seed=1) != a
    assert ev.select_records(records, None, seed=3) == records
    assert ev.select_records(records, 50, seed=3) == records


def test_tables():
    records, completions = detection_case()
    a = {"detection": ev.detection_metrics(records, completions)}
    perfect = [completion(r["boxes"]) for r in records]
    b = {"detection": ev.detection_metrics(records, perfect),
         "spatial": ev.spatial_metrics([{"task": "spatial", "question_type": "object_counting", "answer": "2"}],
                                       [completion("2")])}
    table = ev.markdown_table(a)
    assert "| detection | F1@0.25 | 25.0 |" in table
    assert "| chair | 2 | 2 | 2 | 50.0 | 50.0 | 50.0 |" in table
    assert "| (other labels) | - | 1 | - |" in table

    cmp = ev.compare_table(a, b, ("SFT", "GRPO")).splitlines()
    assert cmp[0] == "| metric | SFT | GRPO | Δ GRPO − SFT |"
    assert "| detection/F1@0.25 | 25.0 | 100.0 | +75.0 |" in cmp
    assert "| detection/F1@0.5 | 12.5 | 100.0 | +87.5 |" in cmp
    assert "| spatial/overall | - | 100.0 | - |" in cmp  # missing in the first: no delta
    three = ev.compare_table(a, b, ("A", "B", "C"), more=[a])
    assert three.splitlines()[0].endswith("| Δ B − A | Δ C − A |")
    with pytest.raises(ValueError, match="names"):
        ev.compare_table(a, b, ("A",))


# ----------------------------------------------------------------------------- command line

def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        ev.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--split", "--tasks", "--limit", "--seed", "--batch-size",
                 "--max-new-tokens", "--out", "--compare", "--names", "--device", "--dtype", "--geometry"):
        assert flag in text


def test_cli_missing_model_dir_is_one_line(tmp_path):
    make_records(tmp_path / "data" / "val", n=1)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", str(tmp_path / "nope"),
                           "--data", str(tmp_path / "data"), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: model directory not found")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_missing_data_and_results_files(tmp_path):
    with pytest.raises(SystemExit, match="^error: data directory not found"):
        ev.main(["--data", str(tmp_path / "nodata")])
    with pytest.raises(SystemExit, match="^error: records not found"):
        ev.main(["--data", str(tmp_path), "--split", "val"])
    with pytest.raises(SystemExit, match="^error: results file not found"):
        ev.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])


def test_cli_compare(tmp_path, capsys):
    records, completions = detection_case()
    for name, comps in (("sft", completions), ("grpo", [completion(r["boxes"]) for r in records])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"detection": ev.detection_metrics(records, comps)}))
    ev.main(["--compare", str(tmp_path / "sft.json"), str(tmp_path / "grpo.json")])
    out = capsys.readouterr().out
    assert "| metric | sft | grpo | Δ grpo − sft |" in out
    assert "| detection/F1@0.25 | 25.0 | 100.0 | +75.0 |" in out


# ----------------------------------------------------------------------------- end to end

def test_toy_model_end_to_end(tmp_path):
    import model

    make_records(tmp_path / "val", n=2)
    net, tokenizer, cfg = model.load_model("toy")
    net.train()
    results = ev.evaluate(net, tokenizer, cfg, str(tmp_path), split="val", tasks=("detection",),
                          batch_size=2, max_new_tokens=6, progress=False)
    assert net.training  # the caller's mode is restored
    m = results["detection"]
    assert m["num_samples"] == 2 and m["format_rate"] == 0.0  # a random model writes no valid answer
    assert m["@0.25"]["per_category"]["chair"]["fn"] == 2
    assert len(m["samples"]) == 2 and isinstance(m["samples"][0]["completion"], str)
    assert results["meta"]["split"] == "val"
    json.dumps(results)
    assert "detection" in ev.markdown_table(results)
    # the same records one by one give the same greedy completions as in a batch of two
    singles = [ev.generate_completions(net, tokenizer, cfg, [r], max_new_tokens=6, progress=False)[0][0]
               for r in ev.load_eval_records(str(tmp_path), "val", "detection", None, 0)]
    assert singles == [s["completion"] for s in m["samples"]]


def test_several_evaluation_seeds_in_one_run_match_one_run_each(tmp_path):
    """--seed 0,1 loads the model once and writes the file of each seed, the same as two runs."""
    make_records(tmp_path / "val", n=4)
    common = ["--data", str(tmp_path), "--limit", "2", "--max-new-tokens", "4", "--no-progress"]
    ev.main(common + ["--seed", "0,1", "--out", str(tmp_path / "both_seed{seed}.json")])
    for seed in (0, 1):
        ev.main(common + ["--seed", str(seed), "--out", str(tmp_path / f"one_seed{seed}.json")])
    both = [ev.load_results(str(tmp_path / f"both_seed{seed}.json")) for seed in (0, 1)]
    one = [ev.load_results(str(tmp_path / f"one_seed{seed}.json")) for seed in (0, 1)]
    for a, b, seed in zip(both, one, (0, 1)):
        assert a["meta"]["seed"] == seed and a["detection"]["samples"] == b["detection"]["samples"]
    # the two seeds evaluate other subsets of the 4 records
    assert [s["id"] for s in both[0]["detection"]["samples"]] != [s["id"] for s in both[1]["detection"]["samples"]]
