"""Tests for rewards.py: safe parsing, the metrics, and every reward.

The rewards are checked against hand-worked values, and all of them against a few thousand
random and hostile strings (the box maths and the IoU are tested in test_boxes.py).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boxes as B  # noqa: E402
import rewards as R  # noqa: E402
from tests.test_boxes import random_rigid  # noqa: E402

RNG_SEED = 1234



# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def completion(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


# ---------------------------------------------------------------------------------------------
# 3. parsing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>t</think><answer>a</answer>", ("t", "a")),
    ("  \n<think></think>\n<answer> [1] </answer>\n", ("", "[1]")),
    ("<think>multi\nline</think> <answer>x\ny</answer>", ("multi\nline", "x\ny")),
    ("<answer>a</answer>", (None, None)),
    ("<think>t</think>", (None, None)),
    ("hi <think>t</think><answer>a</answer>", (None, None)),
    ("<think>t</think><answer>a</answer> bye", (None, None)),
    ("<think>t</think>x<answer>a</answer>", (None, None)),
    ("<think>t</think><answer>a</answer><answer>b</answer>", (None, None)),
    ("<think><think>t</think><answer>a</answer>", (None, None)),
    ("<answer>a</answer><think>t</think>", (None, None)),
    ("<think>t<answer>a</answer></think>", (None, None)),
    ("<think>t</think><answer>a", (None, None)),
    (None, (None, None)),
])
def test_parse_completion(text, expected):
    assert R.parse_completion(text) == expected


def test_parse_json():
    assert R.parse_json('[{"label": "chair", "bbox_3d": [1, 2]}]') == [
        {"label": "chair", "bbox_3d": [1, 2]}]
    assert R.parse_json("[{'label': 'chair', 'bbox_3d': (1, 2,)}]") == [
        {"label": "chair", "bbox_3d": (1, 2)}]
    assert R.parse_json('```json\n{"frame": 3}\n```') == {"frame": 3}
    assert R.parse_json("[" * 50 + "]" * 50) is None
    assert R.parse_json("1" * (R.MAX_ANSWER_CHARS + 1)) is None
    assert R.parse_json("__import__('os').system('echo hi')") is None
    assert R.parse_json("lambda: 1") is None
    assert R.parse_json("[1, 2") is None
    assert R.parse_json("") is None
    assert R.parse_json(None) is None


def test_parse_json_is_silent_on_text_python_warns_about():
    """Malformed model output is normal during RL: it scores 0 without a line of stderr each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert R.parse_json("[1.2or 3]") is None            # SyntaxWarning: invalid decimal literal
        assert R.parse_json('["\\d"]') == ["\\d"]          # DeprecationWarning: invalid escape
    assert caught == []


def test_parse_boxes():
    box = [0.5, 0.2, 2.0, 1.0, 1.0, 1.0, 0.1, 0.0, 0.0]
    assert R.parse_boxes(json.dumps([{"label": "chair", "bbox_3d": box}])) == [
        {"label": "chair", "bbox_3d": box}]
    assert R.parse_boxes("[]") == []
    bad_boxes = [box[:8], [*box[:3], 0.0, *box[4:]], [*box[:3], -1.0, *box[4:]],
                 [*box[:8], True], [*box[:8], "1"], [*box[:8], 2e4]]
    for bad in bad_boxes:
        assert R.parse_boxes(json.dumps([{"label": "chair", "bbox_3d": bad}])) is None
    assert R.parse_boxes('[{"label": "chair", "bbox_3d": [NaN, 0, 0, 1, 1, 1, 0, 0, 0]}]') is None
    assert R.parse_boxes('[{"label": "c", "bbox_3d": [1e999, 0, 0, 1, 1, 1, 0, 0, 0]}]') is None
    assert R.parse_boxes(json.dumps([{"label": 3, "bbox_3d": box}])) is None
    assert R.parse_boxes(json.dumps([{"label": " ", "bbox_3d": box}])) is None
    assert R.parse_boxes(json.dumps([{"bbox_3d": box}])) is None
    assert R.parse_boxes(json.dumps({"label": "chair", "bbox_3d": box})) is None
    assert R.parse_boxes(json.dumps([{"label": "c", "bbox_3d": box}, 5])) is None
    many = [{"label": "c", "bbox_3d": box}] * (R.MAX_BOXES + 1)
    assert R.parse_boxes(json.dumps(many)) is None


def test_parse_grounding():
    box = [0, 0, 2, 1, 1, 1, 0, 0, 0]
    assert R.parse_grounding(json.dumps({"frame": 3, "bbox_3d": box})) == (3, box)
    assert R.parse_grounding(json.dumps({"frame": -2, "bbox_3d": box})) == (-2, box)
    for frame in (3.0, "3", True, None, [3]):
        assert R.parse_grounding(json.dumps({"frame": frame, "bbox_3d": box})) is None
    assert R.parse_grounding(json.dumps({"frame": 3})) is None
    assert R.parse_grounding(json.dumps([{"frame": 3, "bbox_3d": box}])) is None


@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("b", "B"), ("A.", "A"), ("(A)", "A"), ("C)", "C"), ("D:", "D"),
    ("A. the chair", "A"), ("(B) left of the table", "B"), ('"A"', "A"), (" A \n", "A"),
    ("Apple", None), ("A chair", None), ("", None), ("AB", None), ("1", None), ("(A", None),
    ("A" * 500, None),
])
def test_parse_choice(text, letter):
    assert R.parse_choice(text) == letter


@pytest.mark.parametrize("text, number", [
    ("3", 3.0), ("-2.5", -2.5), ("1e-3", 1e-3), ("3.5 m", 3.5), ("12 square meters", 12.0),
    ('"2.5"', 2.5), ("4.", 4.0), (".5", 0.5), ("7 chairs", 7.0), ("3m", 3.0),
    ("NaN", None), ("nan", None), ("Infinity", None), ("1e999", None), ("true", None),
    ("three", None), ("", None), ("[3]", None), ("3 4", None), ("1" * 300, None),
])
def test_parse_number(text, number):
    assert R.parse_number(text) == number


# ---------------------------------------------------------------------------------------------
# 4. metrics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    (100, 100, 1.0), (105, 100, 1.0), (95, 100, 1.0), (110, 100, 0.9), (90, 100, 0.9),
    (125, 100, 0.6), (150, 100, 0.1), (50, 100, 0.1), (151, 100, 0.0), (49, 100, 0.0),
    (-100, 100, 0.0), (1.1, 1.0, 0.9), (-1.05, -1.0, 1.0), (0.0, 0.0, 1.0), (0.1, 0.0, 0.0),
    (float("nan"), 1.0, 0.0),
])
def test_mra(pred, gt, expected):
    assert R.mra(pred, gt) == pytest.approx(expected, abs=1e-12)


def det(label: str, box: list[float]) -> dict:
    return {"label": label, "bbox_3d": box}


CHAIR = [0, 0, 3, 1, 1, 1, 0, 0, 0]
TABLE = [2, 0, 4, 2, 1, 1, 0.2, 0, 0]


def test_match_detections():
    gt = [det("chair", CHAIR), det("table", TABLE)]
    assert R.match_detections([det("chair", CHAIR), det("table", TABLE)], gt) == (2, 0, 0)
    assert R.match_detections([det("Chair ", CHAIR)], gt) == (1, 0, 1)       # label normalised
    assert R.match_detections([det("table", CHAIR)], gt) == (0, 1, 2)        # wrong label
    assert R.match_detections([det("chair", CHAIR)] * 2, gt) == (1, 1, 1)    # duplicate
    assert R.match_detections([], gt) == (0, 0, 2)
    assert R.match_detections([det("chair", CHAIR)], []) == (0, 1, 0)
    # IoU 1/3 passes 0.25 but not 0.5
    shifted = [0.5, 0, 3, 1, 1, 1, 0, 0, 0]
    assert R.match_detections([det("chair", shifted)], gt, 0.25) == (1, 0, 1)
    assert R.match_detections([det("chair", shifted)], gt, 0.5) == (0, 1, 2)
    # greedy in output order: the first prediction takes the GT it overlaps most
    g1, g2 = [0, 0, 3, 1, 1, 1, 0, 0, 0], [0.6, 0, 3, 1, 1, 1, 0, 0, 0]
    p1 = [0.4, 0, 3, 1, 1, 1, 0, 0, 0]          # IoU 0.43 with g1, 0.67 with g2 -> takes g2
    p2 = [0.6, 0, 3, 1, 1, 1, 0, 0, 0]          # would be perfect on g2, gets g1 at IoU 0.25
    assert R.match_detections([det("c", p1), det("c", p2)], [det("c", g1), det("c", g2)]) == (
        1, 1, 1)
    assert R.match_detections([det("c", p2), det("c", p1)], [det("c", g1), det("c", g2)]) == (
        2, 0, 0)


# ---------------------------------------------------------------------------------------------
# 5. rewards
# ---------------------------------------------------------------------------------------------

def det_record(boxes: list[dict]) -> dict:
    return {"task": "detection", "boxes": boxes}


def det_answer(boxes: list[dict]) -> str:
    return completion(json.dumps(boxes))


DET_GT = det_record([det("chair", CHAIR), det("table", TABLE)])


@pytest.mark.parametrize("pred, iou, f1", [
    ([det("chair", CHAIR), det("table", TABLE)], 1.0, 1.0),
    ([det("chair", CHAIR)], 1.0, 2 / 3),                        # partial: TP 1, FN 1
    ([det("table", CHAIR)], 1.0, 0.0),                          # wrong label: IoU ignores it
    ([det("chair", CHAIR), det("chair", CHAIR)], 1.0, 0.5),     # duplicate: TP 1, FP 1, FN 1
    ([det("chair", [0.5, 0, 3, 1, 1, 1, 0, 0, 0])], 1 / 3, 2 / 3),
    ([det("chair", [0.7, 0, 3, 1, 1, 1, 0, 0, 0])], 0.3 / 1.7, 0.0),   # IoU 0.176 < 0.25
    ([det("chair", CHAIR), det("sofa", [9, 9, 9, 1, 1, 1, 0, 0, 0])], 0.5, 0.5),
    ([], 0.0, 0.0),                                             # empty pred, GT not empty
])
def test_detection_rewards(pred, iou, f1):
    text = det_answer(pred)
    assert R.format_reward(text, DET_GT) == 1.0
    assert R.iou_reward(text, DET_GT) == pytest.approx(iou, abs=1e-9)
    assert R.f1_reward(text, DET_GT) == pytest.approx(f1, abs=1e-9)


def test_detection_empty_cases():
    empty = det_record([])
    assert R.iou_reward(det_answer([]), empty) == 1.0
    assert R.f1_reward(det_answer([]), empty) == 1.0
    assert R.iou_reward(det_answer([det("chair", CHAIR)]), empty) == 0.0
    assert R.f1_reward(det_answer([det("chair", CHAIR)]), empty) == 0.0
    assert R.format_reward(det_answer([]), empty) == 1.0


def test_detection_malformed():
    for text in ("[]", completion("[{'label': 'chair'}]"), completion("nothing"),
                 "<think></think><answer>" + json.dumps([det("chair", CHAIR)])):
        for fn in (R.format_reward, R.iou_reward, R.f1_reward):
            assert fn(text, DET_GT) == 0.0
    # python-literal answers are accepted
    text = completion(str([det("chair", CHAIR)]))
    assert R.format_reward(text, DET_GT) == 1.0 and R.iou_reward(text, DET_GT) == 1.0


def test_iou_both_ways_reward():
    half_found = det_answer([det("chair", CHAIR)])
    assert R.iou_both_ways_reward(half_found, DET_GT) == pytest.approx(0.75)   # docstring example
    assert R.iou_reward(half_found, DET_GT) == 1.0                             # R_IoU misses the miss
    assert R.iou_both_ways_reward(det_answer([det("chair", CHAIR), det("table", TABLE)]), DET_GT) == 1.0
    assert R.iou_both_ways_reward(det_answer([det("sofa", CHAIR)]), DET_GT) == pytest.approx(0.75)  # labels ignored
    assert R.iou_both_ways_reward(det_answer([]), det_record([])) == 1.0
    assert R.iou_both_ways_reward(det_answer([]), DET_GT) == 0.0
    assert R.iou_both_ways_reward("no answer", DET_GT) == 0.0
    # parity with a plain loop over box3d_iou, on shifted and resized copies of the two boxes
    rng = np.random.default_rng(1)
    for _ in range(20):
        pred = [det("x", [*(np.array(b[:3]) + rng.normal(0, 0.4, 3)), *(np.array(b[3:6]) * rng.uniform(0.7, 1.3, 3)), *b[6:]])
                for b in (CHAIR, TABLE)[:int(rng.integers(1, 3))]]
        gt = [g["bbox_3d"] for g in DET_GT["boxes"]]
        iou = [[B.box3d_iou(p["bbox_3d"], g) for g in gt] for p in pred]
        by_hand = 0.5 * sum(max(row) for row in iou) / len(pred) + 0.5 * sum(
            max(iou[i][j] for i in range(len(pred))) for j in range(len(gt))) / len(gt)
        assert R.iou_both_ways_reward(det_answer(pred), DET_GT) == pytest.approx(by_hand, abs=1e-9)


def centre_by_hand(pred: list[dict], gt: list[dict], scale: float) -> float:
    """R_centre re-computed with plain loops (the parity reference for the vectorised one)."""
    def close(a: dict, b: dict) -> float:
        if a["label"].strip().lower() != b["label"].strip().lower():
            return 0.0
        return math.exp(-math.dist(a["bbox_3d"][:3], b["bbox_3d"][:3]) / scale)
    precision_half = sum(max(close(p, g) for g in gt) for p in pred) / len(pred)
    recall_half = sum(max(close(p, g) for p in pred) for g in gt) / len(gt)
    return 0.5 * precision_half + 0.5 * recall_half


def test_centre_reward():
    scale = R.CENTRE_SCALE_M
    # worked example of the docstring: one chair 0.5 m off -> exp(-1) in both halves
    moved = [0, 0, 3.5, 1, 1, 1, 0, 0, 0]
    assert R.centre_reward(det_answer([det("chair", moved)]), det_record([det("chair", CHAIR)])) == (
        pytest.approx(math.exp(-0.5 / scale)))
    assert R.centre_reward(det_answer([det("chair", CHAIR), det("table", TABLE)]), DET_GT) == 1.0
    assert R.centre_reward(det_answer([det("sofa", CHAIR)]), DET_GT) == 0.0        # labels count
    # the recall half: finding only the chair scores 1 for precision, 1/2 for recall
    assert R.centre_reward(det_answer([det("chair", CHAIR)]), DET_GT) == pytest.approx(0.75)
    # a closer miss scores more, although both have IoU 0 (the point of this shaping term)
    near, far = [0, 0, 4.2, 1, 1, 1, 0, 0, 0], [0, 0, 5, 1, 1, 1, 0, 0, 0]
    assert R.iou_reward(det_answer([det("chair", near)]), DET_GT) == 0.0
    assert (R.centre_reward(det_answer([det("chair", near)]), DET_GT)
            > R.centre_reward(det_answer([det("chair", far)]), DET_GT) > 0.0)
    # empty cases as for R_IoU / R_F1, malformed text scores 0
    assert R.centre_reward(det_answer([]), det_record([])) == 1.0
    assert R.centre_reward(det_answer([]), DET_GT) == 0.0
    assert R.centre_reward(det_answer([det("chair", CHAIR)]), det_record([])) == 0.0
    assert R.centre_reward("no answer", DET_GT) == 0.0
    # parity with the plain loop on random scenes (several labels, duplicates, misses)
    rng = np.random.default_rng(0)
    labels = ["chair", "table", "Chair ", "sofa"]
    for _ in range(50):
        def boxes(n: int) -> list[dict]:
            return [det(str(rng.choice(labels)), [*np.round(rng.uniform(-3, 3, 3), 2), 1, 1, 1, 0, 0, 0])
                    for _ in range(n)]
        pred, gt = boxes(int(rng.integers(1, 5))), boxes(int(rng.integers(1, 5)))
        assert R.centre_reward(det_answer(pred), det_record(gt)) == pytest.approx(
            centre_by_hand(pred, gt, scale), abs=1e-12)


GT_BOX = [1.0, 2.0, 0.5, 0.8, 0.6, 1.0, 0.3, 0.0, 0.0]


def grd_record(cams: list[np.ndarray], align: np.ndarray, gt_frame: int = 3) -> dict:
    return {"task": "grounding", "gt_bbox": GT_BOX, "gt_frame": gt_frame,
            "cam2global": [c.tolist() for c in cams], "axis_align_matrix": align.tolist()}


def grd_answer(frame, box) -> str:
    return completion(json.dumps({"frame": frame, "bbox_3d": box}))


def test_grounding_identity_transforms():
    rec = grd_record([np.eye(4)] * 8, np.eye(4))
    for frame, expected in ((3, 1.0), (5, 0.6), (0, 0.4), (7, 0.2)):
        text = grd_answer(frame, GT_BOX)
        assert R.format_reward(text, rec) == 1.0
        assert R.frame_reward(text, rec) == pytest.approx(expected)
        assert R.grounding_iou_reward(text, rec) == pytest.approx(1.0, abs=1e-9)
    rec_long = grd_record([np.eye(4)] * 20, np.eye(4))
    assert R.frame_reward(grd_answer(12, GT_BOX), rec_long) == 0.0   # 9 frames off
    yaw = GT_BOX[6]                       # shift by half the x extent along the box's x axis
    shifted = [GT_BOX[0] + 0.4 * math.cos(yaw), GT_BOX[1] + 0.4 * math.sin(yaw), *GT_BOX[2:]]
    assert R.grounding_iou_reward(grd_answer(3, shifted), rec) == pytest.approx(1 / 3)


@pytest.mark.parametrize("frame", [8, 9, -1, 3.0, "3", True, None, 10**12])
def test_grounding_invalid_frame(frame):
    rec = grd_record([np.eye(4)] * 8, np.eye(4))
    text = grd_answer(frame, GT_BOX)
    assert R.frame_reward(text, rec) == 0.0
    assert R.grounding_iou_reward(text, rec) == 0.0
    assert R.format_reward(text, rec) == (1.0 if frame in (8, 9, -1) and frame is not True
                                          else 0.0)


def test_grounding_nontrivial_poses():
    rng = np.random.default_rng(RNG_SEED)
    cams = [random_rigid(rng) for _ in range(6)]
    align = random_rigid(rng)
    rec = grd_record(cams, align, gt_frame=2)
    for f in range(6):
        # the GT box written in frame f's camera coordinates
        in_cam = B.transform_box(GT_BOX, np.linalg.inv(align @ cams[f]))
        text = grd_answer(f, in_cam)
        assert R.grounding_iou_reward(text, rec) == pytest.approx(1.0, abs=1e-6)
        assert R.frame_reward(text, rec) == pytest.approx(max(0, 1 - abs(f - 2) / 5))
        # the same numbers claimed for another frame land elsewhere in the scene
        assert R.grounding_iou_reward(grd_answer((f + 1) % 6, in_cam), rec) < 0.5
    # the box in scene coordinates is wrong unless the poses are the identity
    assert R.grounding_iou_reward(grd_answer(2, GT_BOX), rec) < 0.5


MC_REC = {"task": "spatial", "question_type": "object_rel_direction", "answer": "B",
          "options": ["A. left", "B. right", "C. behind", "D. front"]}
NUM_REC = {"task": "spatial", "question_type": "object_abs_distance", "answer": "2.0"}


@pytest.mark.parametrize("answer, expected", [
    ("B", 1.0), ("b", 1.0), ("B.", 1.0), ("(B)", 1.0), ("B. right", 1.0), ("B)", 1.0),
    ("A", 0.0), ("right", 0.0), ("B right", 0.0), ("", 0.0),
])
def test_accuracy_reward(answer, expected):
    text = completion(answer)
    assert R.accuracy_reward(text, MC_REC) == expected
    assert R.spatial_reward(text, MC_REC) == expected
    assert R.mra_reward(text, MC_REC) == 0.0


def test_accuracy_gt_variants_and_format():
    rec = dict(MC_REC, answer="b. right")
    assert R.accuracy_reward(completion("B"), rec) == 1.0
    assert R.format_reward(completion("C"), MC_REC) == 1.0
    assert R.format_reward(completion("right"), MC_REC) == 0.0
    assert R.format_reward(completion("2.0"), NUM_REC) == 1.0
    assert R.format_reward(completion("B"), NUM_REC) == 0.0


@pytest.mark.parametrize("answer, expected", [
    ("2", 1.0), ("2.1", 1.0), ("2.2 m", 0.9), ("3", 0.1), ("1", 0.1), ("3.02", 0.0),
    ("B", 0.0), ("nan", 0.0), ("1e999", 0.0),
])
def test_mra_reward(answer, expected):
    text = completion(answer)
    assert R.mra_reward(text, NUM_REC) == pytest.approx(expected)
    assert R.spatial_reward(text, NUM_REC) == pytest.approx(expected)
    assert R.accuracy_reward(text, NUM_REC) == 0.0
    assert R.mra_reward(text, dict(NUM_REC, answer=2)) == pytest.approx(expected)


def test_mra_reward_zero_ground_truth():
    rec = dict(NUM_REC, question_type="object_counting", answer="0")
    assert R.mra_reward(completion("0"), rec) == 1.0
    assert R.mra_reward(completion("1"), rec) == 0.0


def test_unknown_question_type_dispatch():
    assert R.spatial_reward(completion("C"), {"task": "spatial", "answer": "C"}) == 1.0
    assert R.spatial_reward(completion("4"), {"task": "spatial", "answer": "4"}) == 1.0


def test_rewards_outside_their_task_are_zero():
    good_det = det_answer([det("chair", CHAIR), det("table", TABLE)])
    grd = grd_record([np.eye(4)] * 8, np.eye(4))
    for rec in (grd, MC_REC, NUM_REC, {"task": "other"}, {}):
        assert R.iou_reward(good_det, rec) == 0.0 and R.f1_reward(good_det, rec) == 0.0
    good_grd = grd_answer(3, GT_BOX)
    for rec in (DET_GT, MC_REC, NUM_REC):
        assert R.frame_reward(good_grd, rec) == 0.0
        assert R.grounding_iou_reward(good_grd, rec) == 0.0
    for rec in (DET_GT, grd):
        assert R.spatial_reward(completion("B"), rec) == 0.0
        assert R.mra_reward(completion("2"), rec) == 0.0
    assert R.format_reward(good_det, {"task": "other"}) == 0.0


# ---------------------------------------------------------------------------------------------
# 6. tables, weights, total
# ---------------------------------------------------------------------------------------------

def test_tables():
    assert set(R.REWARDS) == {"format", "iou", "f1", "iou_both", "centre", "frame", "grounding_iou",
                              "accuracy", "mra", "spatial"}
    assert R.TASK_REWARDS == {"detection": {"format": 1, "iou": 1, "f1": 1},
                              "grounding": {"format": 1, "frame": 1, "grounding_iou": 1},
                              "spatial": {"format": 1, "spatial": 1}}
    for fn in R.REWARDS.values():
        assert fn.reward_range == (0.0, 1.0)


def test_parse_weights():
    assert R.parse_weights("iou=1,f1=0.5,format=1") == {"iou": 1.0, "f1": 0.5, "format": 1.0}
    assert R.parse_weights(" iou = 2 , ") == {"iou": 2.0}
    assert R.parse_weights("") == {}
    for spec, msg in (("iou=1,bogus=2", "unknown reward 'bogus'"), ("iou", "name=number"),
                      ("iou=x", "not a number"), ("iou=1,iou=2", "twice"), ("iou=nan", "finite")):
        with pytest.raises(ValueError, match=msg):
            R.parse_weights(spec)


def test_total_reward():
    text = det_answer([det("chair", CHAIR)])
    total, parts = R.total_reward(text, DET_GT)
    assert parts == pytest.approx({"format": 1.0, "iou": 1.0, "f1": 2 / 3})
    assert total == pytest.approx(1 + 1 + 2 / 3)
    total, parts = R.total_reward(text, DET_GT, R.parse_weights("f1=3,frame=1"))
    assert total == pytest.approx(2.0) and parts["frame"] == 0.0
    total, _ = R.total_reward(text, DET_GT, {"detection": {"format": 0.5}, "spatial": {"mra": 1}})
    assert total == 0.5
    assert R.total_reward("garbage", NUM_REC) == (0.0, {"format": 0.0, "spatial": 0.0})
    with pytest.raises(ValueError):
        R.total_reward(text, DET_GT, {"nope": 1.0})


# ---------------------------------------------------------------------------------------------
# 7. fuzz: random and hostile strings never raise and stay in range
# ---------------------------------------------------------------------------------------------

def hostile_answers(marker: Path) -> list[str]:
    box = "[0.1, 0.2, 3.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]"
    return [
        f"__import__('os').system('touch {marker}')",
        f"[__import__('os').system('touch {marker}')]",
        f"{{'frame': __import__('os').system('touch {marker}'), 'bbox_3d': {box}}}",
        "__import__('os').system('touch /tmp/pwned')",
        f"(lambda: open('{marker}', 'w'))()", "lambda: 0", "exec('1')", "eval('1')",
        "{1, 2, 3}", "{'frame': {1, 2}, 'bbox_3d': {1}}", "b'\\x00\\xff'", "[b'A']",
        "NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "1" + "0" * 400,
        "[" * 100_000, "]" * 1000, "[" * 30 + "]" * 30, "{" * 60 + "}" * 60, "(" * 500,
        "[" * 5000 + "1" + "]" * 5000,
        "a" * 300_000, "\"" + "x" * 19_990 + "\"",
        '[{"label": "chair", "bbox_3d": [NaN, 0, 0, 1, 1, 1, 0, 0, 0]}]',
        '[{"label": "chair", "bbox_3d": [1e999, 0, 0, 1, 1, 1, 0, 0, 0]}]',
        '[{"label": "chair", "bbox_3d": [1e308, 1e308, 1e308, 1e308, 1e308, 1e308, 0, 0, 0]}]',
        '[{"label": "chair", "bbox_3d": [0, 0, 0, 1e-300, 1e-300, 1e-300, 0, 0, 0]}]',
        '[{"label": "chair", "bbox_3d": [0, 0, 0, 1, 1, 1, 1e300, 0, 0]}]',
        '[{"label": "chair", "bbox_3d": ' + "[" * 15 + "]" * 15 + "}]",
        '{"frame": 1e999, "bbox_3d": ' + box + "}", '{"frame": -999999999999, "bbox_3d": ' + box + "}",
        '{"frame": 99999999999999999999999999, "bbox_3d": ' + box + "}",
        '{"frame": NaN, "bbox_3d": ' + box + "}", '{"frame": true, "bbox_3d": ' + box + "}",
        "[" + ", ".join([f'{{"label": "c", "bbox_3d": {box}}}'] * 150) + "]",
        "{'__class__': 1}", "().__class__.__bases__[0].__subclasses__()", "None", "null",
        "True", "...", "1j", "(1+2j)", "'A'", "A" * 10_000, "\x00\x01\x02", "\ud800",
        "日本語の答え", "Ａ", "𝟙", "٣", "\u200b1", "1\u00a0m", "--1", "+-1", "1e", ".", "-.e1",
        "```json\n[1\n```", "```", "``````",
    ]


def random_completion(rng: np.random.Generator, answers: list[str]) -> str:
    """A random completion: a hostile / valid / garbled answer in good or broken tags."""
    alphabet = list("<>/{}[](),:.'\"\\ \n\t-+eE0123456789ABCabcthinkanswer") + [
        "<think>", "</think>", "<answer>", "</answer>", "NaN", "Infinity", "\u00e9", "\U0001F600"]
    kind = rng.integers(6)
    if kind == 0:       # pure noise
        return "".join(rng.choice(alphabet, rng.integers(0, 80)))
    answer = answers[rng.integers(len(answers))]
    if kind == 1:       # truncated
        answer = answer[: rng.integers(0, len(answer) + 1)]
    elif kind == 2:     # one random edit
        pos = rng.integers(0, len(answer) + 1)
        answer = answer[:pos] + str(rng.choice(alphabet)) + answer[pos + rng.integers(0, 3):]
    wrappers = [
        lambda a: f"<think>x</think><answer>{a}</answer>",
        lambda a: f"  <think></think>\n<answer>{a}</answer>\n",
        lambda a: f"<answer>{a}</answer>",
        lambda a: f"<think>x</think><answer>{a}",
        lambda a: f"<think>x<answer>{a}</answer></think>",
        lambda a: f"<think>x</think><answer>{a}</answer><answer>{a}</answer>",
        lambda a: a,
    ]
    return wrappers[rng.integers(len(wrappers))](answer)


def test_fuzz_rewards_never_raise(tmp_path):
    marker = tmp_path / "pwned"
    pwned_before = os.path.exists("/tmp/pwned")
    rng = np.random.default_rng(RNG_SEED)
    box = [0.1, 0.2, 3.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    valid = [
        json.dumps([det("chair", CHAIR), det("table", TABLE)]), json.dumps([det("chair", box)]),
        "[]", json.dumps({"frame": 3, "bbox_3d": GT_BOX}), json.dumps({"frame": 1, "bbox_3d": box}),
        "B", "(A) left", "2.1", "0", "3.5 m", str([det("chair", CHAIR)]),
    ]
    answers = valid + hostile_answers(marker)
    cams = [random_rigid(rng) for _ in range(8)]
    records = [
        DET_GT, det_record([]), grd_record(cams, random_rigid(rng)),
        grd_record([np.eye(4)] * 4, np.eye(4), gt_frame=0), MC_REC, NUM_REC,
        dict(NUM_REC, answer="0"), {"task": "spatial", "answer": "C"}, {"task": "other"},
        {"task": "grounding"}, {"task": "detection", "boxes": "broken"}, {},
    ]
    texts = [completion(a) for a in answers] + [random_completion(rng, answers)
                                                 for _ in range(3000)]
    texts += [None, 123, b"<think></think><answer>[]</answer>", ["<think>"]]  # not even str
    positive = {name: 0 for name in R.REWARDS}
    for text in texts:
        for rec in records:
            for name, fn in R.REWARDS.items():
                value = fn(text, rec)
                lo, hi = fn.reward_range
                assert isinstance(value, float) and math.isfinite(value), (name, text, rec)
                assert lo <= value <= hi, (name, value)
                positive[name] += value > 0
            total, parts = R.total_reward(text, rec)
            assert math.isfinite(total) and all(math.isfinite(v) for v in parts.values())
    for answer in answers:  # the parsers on their own
        for parse in (R.parse_json, R.parse_boxes, R.parse_grounding, R.parse_choice,
                      R.parse_number, R.parse_completion):
            parse(answer)
    assert all(count > 0 for count in positive.values()), positive  # the fuzz reaches scoring
    assert not marker.exists()
    assert os.path.exists("/tmp/pwned") == pwned_before
