"""eval.py against the published evaluation scripts, on hand-computed fixtures.

Upstream files transcribed here (docs/DESIGN.md section 9):
  detection  LaVi-Lab/VG-LLM src/lmms_eval/tasks/threedod/utils.py (cate20, compute_ap,
             threedod_aggregate_results, threedod_process_results)
  grounding  LaVi-Lab/VG-LLM and vgg-llm/Point3R-LLM src/lmms_eval/tasks/scanrefer/utils.py
             (transform_scanrefer_bbox: scipy "zxy"; scanrefer_bbox_to_9dof: "ZXY")
  spatial    vision-x-nyu/thinking-in-space lmms_eval/tasks/vsibench/utils.py

Boxes are nested where an IoU must be exact: a unit cube in a 2 x 1 x 1 box has IoU 0.5, in a
4 x 1 x 1 box 0.25 (as in tests/test_eval.py).
"""
import json
import math

import numpy as np
import pytest

import boxes
import data
import eval as ev
import rewards


def box(x, y, z, dx=1.0, dy=1.0, dz=1.0, yaw=0.0, roll=0.0, pitch=0.0):
    return [x, y, z, dx, dy, dz, yaw, roll, pitch]


def tagged(answer) -> str:
    return data.wrap_answer(answer if isinstance(answer, str) else json.dumps(answer))


def fenced(answer) -> str:
    """A VG LLM-style answer: a ```json fence, one entry per line for a list (its training targets)."""
    if isinstance(answer, list):
        return "```json\n[\n\t" + ",\n\t".join(json.dumps(a) for a in answer) + "\n]```"
    return "```json\n\t" + (answer if isinstance(answer, str) else json.dumps(answer)) + "\n```"


def rigid(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T.tolist()


# ----------------------------------------------------------------------------- lenient parsing

def test_parse_answer_lenient():
    p = rewards.parse_answer_lenient
    assert p("<think>hm</think> <answer> B </answer>") == "B"       # well-formed: as parse_completion
    assert p("<answer>B</answer>") == "B"                             # no think part
    assert p('Sure.\n```json\n{"frame": 2}\n```\nDone.') == '{"frame": 2}'
    assert p('```json\n[\n\t{"a": 1}\n]```') == '[\n\t{"a": 1}\n]'  # VG LLM's closing fence on the last line
    assert p("  3.5 m ") == "3.5 m"                                    # plain text: the whole of it
    assert p("```json\n[1, 2") == "```json\n[1, 2"                     # an unclosed fence is no block
    assert p(None) is None and p("x" * (rewards.MAX_COMPLETION_CHARS + 1)) is None


def test_lenient_boxes_keep_valid_entries_and_complete_lines():
    chair = {"label": "chair", "bbox_3d": box(0, 0, 2)}
    table = {"label": "table", "bbox_3d": box(1, 0, 3)}
    bad = {"label": "lamp", "bbox_3d": [1, 2]}
    assert rewards.parse_boxes_lenient(json.dumps([chair, table])) == rewards.parse_boxes(json.dumps([chair, table]))
    assert rewards.parse_boxes(json.dumps([chair, bad, table])) is None          # the reward: all or nothing
    assert rewards.parse_boxes_lenient(json.dumps([chair, bad, table])) == [chair, table]
    # a multi-line answer cut by the token budget keeps its complete lines (VG LLM's line reading)
    cut = fenced([chair, table])[:-12]
    assert rewards.parse_boxes_lenient(rewards.parse_answer_lenient(cut)) == [chair]
    assert rewards.parse_boxes_lenient("no boxes here") == [] and rewards.parse_boxes_lenient(None) == []
    # the strict parsers and R_format do not change
    assert rewards.format_reward(fenced([chair]), {"task": "detection", "boxes": [chair]}) == 0.0


# ----------------------------------------------------------------------------- detection: ScanNet-20

def vgllm_aggregate(per_category_counts: dict, categories) -> dict:
    """threedod_aggregate_results, transcribed: per category P, R, F1 = 2PR/(P+R) (0 on 0/0),
    then np.mean over the fixed list (a category never seen gives 0)."""
    p, r, f = [], [], []
    for k in categories:
        tp, fp, fn = per_category_counts.get(k, (0, 0, 0))
        precision = tp / (tp + fp) if (tp + fp) > 0 else 0
        recall = tp / (tp + fn) if (tp + fn) > 0 else 0
        p.append(precision)
        r.append(recall)
        f.append(2 * precision * recall / (precision + recall) if (precision + recall) > 0 else 0)
    return {"precision": float(np.mean(p)), "recall": float(np.mean(r)), "f1": float(np.mean(f))}


def test_scannet20_list_is_vgllm_cate20():
    cats = ev.SCANNET20_CATEGORIES
    assert len(cats) == 20 == len(set(cats))
    assert cats[:5] == ("chair", "pillow", "cabinet", "table", "lamp") and cats[-1] == "computer"
    assert "couch" in cats and "sofa" not in cats and "tv" not in cats


def test_scannet20_macro_against_present_mean():
    """chair and table found exactly, the sofa missed: present mean 66.7, ScanNet-20 mean 10.0."""
    gt = [{"label": "chair", "bbox_3d": box(0, 0, 2)}, {"label": "table", "bbox_3d": box(2, 0, 4)},
          {"label": "sofa", "bbox_3d": box(-2, 0, 4)}]
    records = [{"task": "detection", "boxes": gt}]
    completions = [tagged(gt[:2])]
    m = ev.detection_metrics(records, completions)["@0.25"]
    assert m["f1"] == pytest.approx(2 / 3) and m["present"]["f1"] == pytest.approx(2 / 3)
    assert m["present"]["categories"] == 3
    assert m["scannet20"] == {"precision": pytest.approx(0.1), "recall": pytest.approx(0.1), "f1": pytest.approx(0.1),
                              "categories": 2}
    rows = ev.summary({"detection": ev.detection_metrics(records, completions)})
    assert rows["detection/F1@0.25"] == pytest.approx(2 / 3)
    assert rows["detection/F1@0.25 ScanNet-20"] == pytest.approx(0.1)
    assert "| detection | F1@0.25 ScanNet-20 | 10.0 |" in ev.markdown_table({"detection": ev.detection_metrics(
        records, completions)})


def test_scannet20_matches_the_transcribed_vgllm_aggregation():
    """Several records, misses, duplicates, a false positive in a listed category with no ground
    truth anywhere (VG LLM: that category's P = 0; here the "other" bucket; both count 0)."""
    records = [
        {"task": "detection", "boxes": [{"label": "chair", "bbox_3d": box(0, 0, 2)},
                                        {"label": "chair", "bbox_3d": box(3, 0, 2)},
                                        {"label": "bed", "bbox_3d": box(0, 0, 5, dx=2.0)}]},
        {"task": "detection", "boxes": [{"label": "chair", "bbox_3d": box(0, 0, 3)},
                                        {"label": "plant", "bbox_3d": box(5, 0, 5)}]},
    ]
    completions = [
        tagged([{"label": "chair", "bbox_3d": box(0, 0, 2)}, {"label": "chair", "bbox_3d": box(0, 0, 2)},
                {"label": "bed", "bbox_3d": box(0, 0, 5, dx=2.0)}, {"label": "toilet", "bbox_3d": box(9, 0, 9)}]),
        fenced([{"label": "chair", "bbox_3d": box(0, 0, 3, dx=2.0)}, {"label": "plant", "bbox_3d": box(5, 0, 5)}]),
    ]
    m = ev.detection_metrics(records, completions)["@0.25"]
    counts = {c: (v["tp"], v["fp"], v["fn"]) for c, v in m["per_category"].items()}
    assert counts == {"chair": (2, 1, 1), "bed": (1, 0, 0), "plant": (1, 0, 0)} and m["other_fp"] == 1
    counts["toilet"] = (0, 1, 0)  # VG LLM keeps it as its own category
    expected = vgllm_aggregate(counts, ev.SCANNET20_CATEGORIES)
    got = m["scannet20"]
    for k in ("precision", "recall", "f1"):
        assert got[k] == pytest.approx(expected[k], abs=1e-12)
    # by hand: chair P 2/3, R 2/3, F1 2/3; bed 1, 1, 1; plant is not in the list
    assert got["f1"] == pytest.approx((2 / 3 + 1) / 20)
    assert m["f1"] == pytest.approx((2 / 3 + 1 + 1) / 3)  # present categories: chair, bed, plant


def test_headline_is_the_scannet20_mean_for_scannet_records():
    """ScanNet labels (couch, bin: not toy categories): the headline F1 is VG LLM's ScanNet-20 mean,
    the present-category mean a second key. chair and couch found, the bin missed: 2/20 vs 2/3."""
    records = [{"task": "detection", "boxes": [{"label": "chair", "bbox_3d": box(0, 0, 2)}]},
               {"task": "detection", "boxes": [{"label": "couch", "bbox_3d": box(2, 0, 4)},
                                               {"label": "bin", "bbox_3d": box(-2, 0, 4)}]}]
    completions = [tagged(records[0]["boxes"]), fenced(records[1]["boxes"][:1])]
    assert ev.which_category_list(records) == "scannet20" and ev.which_category_list(records[:1]) == "toy"
    metrics = ev.detection_metrics(records, completions)
    m = metrics["@0.25"]
    assert metrics["category_list"] == "scannet20" and m["headline"] == "scannet20" and "toy" not in m
    assert m["f1"] == pytest.approx(0.1) and m["present"]["f1"] == pytest.approx(2 / 3)
    counts = {c: (v["tp"], v["fp"], v["fn"]) for c, v in m["per_category"].items()}
    expected = vgllm_aggregate(counts, ev.SCANNET20_CATEGORIES)  # VG LLM's aggregation, transcribed
    assert {k: m[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    rows = ev.summary({"detection": metrics})
    assert rows["detection/F1@0.25"] == pytest.approx(0.1) == rows["detection/F1@0.25 ScanNet-20"]
    assert rows["detection/F1@0.25 present"] == pytest.approx(2 / 3)
    assert rows["detection/P@0.5 present"] == m["present"]["precision"]  # both thresholds
    # a subset scored under its file's list (evaluate passes it) keeps the ScanNet-20 headline:
    # the chair record alone would look like toy data
    alone = ev.detection_metrics(records[:1], completions[:1], category_list="scannet20")["@0.25"]
    assert alone["f1"] == pytest.approx(1 / 20) and alone["present"]["f1"] == 1.0
    with pytest.raises(ValueError, match="unknown category list"):
        ev.detection_metrics(records, completions, category_list="coco")


def test_toy_headline_stays_the_present_mean():
    """Toy labels: the headline is the present-category mean, equal to the mean over the toy's 8
    categories ("toy") once all 8 are in the ground truth, as in a 600-record held-out evaluation;
    a small subset missing some keeps the present mean as its headline (the toy's logged numbers)."""
    assert ev.TOY_CATEGORIES == ("chair", "table", "sofa", "bed", "cabinet", "lamp", "plant", "tv")
    gt = [{"label": c, "bbox_3d": box(3 * i, 0, 4)} for i, c in enumerate(ev.TOY_CATEGORIES)]
    records = [{"task": "detection", "boxes": gt[:4]}, {"task": "detection", "boxes": gt[4:]}]
    completions = [tagged(gt[:4]), tagged(gt[4:7])]  # the tv missed
    metrics = ev.detection_metrics(records, completions)
    m = metrics["@0.25"]
    assert metrics["category_list"] == "toy" and m["headline"] == "present"
    assert m["f1"] == pytest.approx(7 / 8) == m["toy"]["f1"] == m["present"]["f1"]
    assert m["toy"]["categories"] == 8 and m["scannet20"]["f1"] == pytest.approx(5 / 20)  # chair table bed cabinet lamp
    rows = ev.summary({"detection": metrics})
    assert rows["detection/F1@0.25"] == pytest.approx(7 / 8) and not any(k.endswith(" present") for k in rows)
    few = ev.detection_metrics(records[:1], completions[:1])["@0.25"]  # chair, table, sofa, bed only
    assert few["f1"] == 1.0 == few["present"]["f1"] and few["toy"]["f1"] == pytest.approx(4 / 8)
    # results saved before the rule (no "headline"): read as the present mean
    old = json.loads(json.dumps(metrics))
    for t in ev.IOU_THRESHOLDS:
        del old[f"@{t}"]["headline"]
    assert ev.summary({"detection": old}) == rows


def test_evaluate_takes_the_category_list_from_the_whole_file(tmp_path, monkeypatch):
    """--limit 1 picks a chair-only record of a ScanNet file: still scored under ScanNet-20."""
    import model
    from tests.real_checkpoint import make_records

    make_records(tmp_path / "val", n=3)
    path = tmp_path / "val" / "detection.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["boxes"] = [{"label": "couch", "bbox_3d": box(1, 0, 3)}]
    rows[2]["conversations"][1]["value"] = data.detection_answer(rows[2]["boxes"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seed = next(s for s in range(20) if ev.select_records([0, 1, 2], 1, s) != [2])
    monkeypatch.setattr(ev, "generate_completions", lambda net, tok, cfg, records, *a: ([""] * len(records),
                                                                                     [False] * len(records)))
    _, tokenizer, cfg = model.load_model("toy")
    results = ev.evaluate(None, tokenizer, cfg, str(tmp_path), "val", limit=1, seed=seed, progress=False)
    m = results["detection"]
    assert m["num_samples"] == 1 and m["categories"] == ["chair"] and m["category_list"] == "scannet20"
    assert m["@0.25"]["headline"] == "scannet20" and m["max_new_tokens"] == data.max_new_tokens("detection", False)


def test_detection_euler_convention_is_vgllm_s():
    """VG LLM's detection IoU builds corners with pytorch3d euler_angles_to_matrix(angles, "ZXY") =
    Rz(a0) Rx(a1) Ry(a2) (right-handed), centre-origin full extents: boxes.box_rotation exactly."""
    a, b, c = 0.3, -0.4, 1.1
    cz, sz, cx, sx, cy, sy = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])  # pytorch3d _axis_angle_rotation("Z")
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    assert np.allclose(boxes.box_rotation(a, b, c), Rz @ Rx @ Ry, atol=1e-15)
    # scipy's lower-case "zxy" (extrinsic), as VG LLM's first ScanRefer evaluation read boxes, differs;
    # reference values from scipy 1.17 Rotation.from_euler("zxy", [0.3, -0.4, 1.1]).as_matrix()
    scipy_zxy = [[0.3307759017266339, -0.4655987295663282, 0.8208563369208727],
                 [0.2721921352954314, 0.879923176281257, 0.38941834230865036],
                 [-0.9036032007027451, 0.0946204357912436, 0.4177896944760956]]
    assert np.allclose(ev.extrinsic_zxy_rotation(a, b, c), scipy_zxy, atol=1e-14)
    assert np.allclose(ev.extrinsic_zxy_rotation(a, b, c), Ry @ Rx @ Rz, atol=1e-15)
    assert not np.allclose(ev.extrinsic_zxy_rotation(a, b, c), boxes.box_rotation(a, b, c), atol=1e-3)
    # Rotation.from_matrix(box_rotation(0.7, 0.2, -0.5)).as_euler("zxy") in scipy 1.17
    assert np.allclose(ev.extrinsic_zxy_angles(boxes.box_rotation(0.7, 0.2, -0.5)),
                       [0.5812994357927316, 0.45805414967480296, -0.28754772736204326], atol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(50):
        angles = rng.uniform([-3, -1.5, -3], [3, 1.5, 3])
        assert np.allclose(ev.extrinsic_zxy_angles(ev.extrinsic_zxy_rotation(*angles)), angles, atol=1e-9)


# ----------------------------------------------------------------------------- grounding

# Frame 1's camera looks along the scene's +y: camera x -> scene x, camera y (down) -> scene -z,
# camera z (forward) -> scene y; it stands at (1, 2, 1.5). The axis alignment shifts by -1 in x.
CAM = [[1, 0, 0], [0, 0, 1], [0, -1, 0]]
POSES = [np.eye(4).tolist(), rigid(CAM, [1, 2, 1.5])]
ALIGN = rigid(np.eye(3), [-1, 0, 0])
# A camera-frame box: centre (0.5, 0.2, 3), 1 wide, 2 high, 0.5 deep, turned 90 degrees about the
# camera's z (yaw): its local x runs along camera y, its local y along camera -x.
CAM_BOX = box(0.5, 0.2, 3, dx=1.0, dy=2.0, dz=0.5, yaw=math.pi / 2)
# By hand: centre R c + t + shift = (0.5, 3, -0.2) + (1, 2, 1.5) + (-1, 0, 0) = (0.5, 5, 1.3); the
# 1 m side runs along camera y = scene z, the 2 m side along camera x = scene x, 0.5 m along scene y.
SCENE_BOX = box(0.5, 5, 1.3, dx=2.0, dy=0.5, dz=1.0)


def grounding_record(gt_bbox, gt_frame=1, subset=None):
    r = {"task": "grounding", "gt_frame": gt_frame, "gt_bbox": gt_bbox, "cam2global": POSES,
         "axis_align_matrix": ALIGN}
    if subset is not None:
        r["metadata"] = {"dataset": "scanrefer", "question_type": subset, "ann_id": "0", "object_id": "7"}
    return r


def test_camera_to_scene_transform_by_hand():
    answer = {"frame": 1, "bbox_3d": CAM_BOX}
    record = grounding_record(SCENE_BOX)
    assert rewards.grounding_iou_reward(tagged(answer), record) == pytest.approx(1.0)
    moved = ev.vgllm_box_to_scene(CAM_BOX, np.asarray(ALIGN) @ np.asarray(POSES[1]), "ZXY")
    def corner_set(b):
        return sorted(map(tuple, np.round(boxes.box_corners(b), 9).tolist()))

    assert corner_set(moved) == corner_set(SCENE_BOX)  # the same 8 corners, in some order
    # the same box, twice as long in x in the ground truth: IoU exactly 1/2
    assert ev.grounding_iou(fenced(answer), grounding_record(box(0.5, 5, 1.3, dx=4.0, dy=0.5, dz=1.0))) \
        == pytest.approx(0.5)
    # Read as VG LLM's first release read it (scipy "zxy" in and out, then intrinsic ZXY in the
    # IoU), the same numbers make another box: the scene rotation Rcam @ Rz(90) has extrinsic
    # angles (pi/2, -pi/2, 0) (scipy: gimbal lock, third angle 0), and Rz(pi/2) Rx(-pi/2) turns
    # the 2 m side upright. IoU 1/7 (scipy 1.17 transcription of transform_scanrefer_bbox).
    legacy = ev.vgllm_box_to_scene(CAM_BOX, np.asarray(ALIGN) @ np.asarray(POSES[1]), "zxy")
    assert np.allclose(legacy, [0.5, 5, 1.3, 1, 2, 0.5, math.pi / 2, -math.pi / 2, 0], atol=1e-12)
    assert ev.grounding_iou(tagged(answer), record, euler="zxy") == pytest.approx(1 / 7)


def test_legacy_zxy_answers_score_under_euler_zxy():
    """A box written as VG LLM's first release wrote its targets (world -> camera with scipy "zxy")
    scores 1 under euler="zxy", less under the project's intrinsic ZXY reading."""
    E = np.asarray(rigid(boxes.box_rotation(0.6, -1.9, 0.0), [0.3, -0.2, 1.4]))  # yawed, tilted camera
    gt = box(1.0, 2.0, 0.5, dx=1.6, dy=0.4, dz=0.9)
    inv = np.linalg.inv(E)
    centre = inv[:3, :3] @ np.array(gt[:3]) + inv[:3, 3]
    angles = ev.extrinsic_zxy_angles(inv[:3, :3] @ ev.extrinsic_zxy_rotation(0, 0, 0))
    legacy = [*centre.tolist(), *gt[3:6], *angles]
    record = {"task": "grounding", "gt_frame": 0, "gt_bbox": gt, "cam2global": [E.tolist()],
              "axis_align_matrix": np.eye(4).tolist()}
    answer = tagged({"frame": 0, "bbox_3d": legacy})
    assert ev.grounding_iou(answer, record, euler="zxy") == pytest.approx(1.0, abs=1e-9)
    assert ev.grounding_iou(answer, record, euler="ZXY") < 0.9
    assert ev.score("grounding", [record], [answer], euler="zxy")["acc@0.5"] == 1.0
    with pytest.raises(ValueError, match="Euler convention"):
        ev.grounding_metrics([record], [answer], euler="xyz")


def test_vgllm_box_to_scene_matches_a_scipy_transcription():
    """Literal transcription of VG LLM's transform_scanrefer_bbox (scipy: a test requirement)."""
    from scipy.spatial.transform import Rotation

    def transform_scanrefer_bbox(bbox, extrinsic, convention):
        center, sizes = bbox[0:3], bbox[3:6]
        rot = Rotation.from_euler(convention, np.array(bbox[6:9]))
        center = (extrinsic @ np.array([*center, 1]).reshape(4, 1)).reshape(4)[:3].tolist()
        rot = Rotation.from_matrix(extrinsic[:3, :3] @ rot.as_matrix())
        return center + list(sizes) + list(rot.as_euler(convention))

    rng = np.random.default_rng(3)
    for i in range(100):
        E = np.asarray(rigid(Rotation.random(random_state=i).as_matrix(), rng.uniform(-2, 2, 3)))
        b = [*rng.uniform(-1, 1, 3), *rng.uniform(0.3, 1.5, 3), *rng.uniform(-1.4, 1.4, 3)]
        for convention in ev.EULER_CONVENTIONS:
            theirs, ours = transform_scanrefer_bbox(b, E, convention), ev.vgllm_box_to_scene(b, E, convention)
            assert np.allclose(theirs[:6], ours[:6], atol=1e-12)
            assert np.allclose(boxes.box_rotation(*theirs[6:]), boxes.box_rotation(*ours[6:]), atol=1e-12)


def test_vgllm_ZXY_transform_equals_the_reward():
    rng = np.random.default_rng(1)
    for _ in range(20):
        R = boxes.box_rotation(*rng.uniform(-1.5, 1.5, 3))
        pose = rigid(R, rng.uniform(-2, 2, 3))
        cam_box = [*rng.uniform(-1, 1, 2), rng.uniform(1, 3), *rng.uniform(0.3, 1.5, 3), *rng.uniform(-1, 1, 3)]
        gt = [*rng.uniform(-1, 1, 3), *rng.uniform(0.5, 2, 3), 0.0, 0.0, 0.0]
        record = {"task": "grounding", "gt_frame": 0, "gt_bbox": gt, "cam2global": [pose], "axis_align_matrix": ALIGN}
        reward = rewards.grounding_iou_reward(tagged({"frame": 0, "bbox_3d": cam_box}), record)
        moved = ev.vgllm_box_to_scene(cam_box, np.asarray(ALIGN) @ np.asarray(pose), "ZXY")
        assert boxes.box3d_iou(moved, gt) == pytest.approx(reward, abs=1e-9)


def test_grounding_acc_unique_multiple_and_missing_frames():
    # IoU 1 (unique), 1/4 (unique), 1/2 (multiple), 0 (multiple: wrong frame), 1 (no label)
    records = [grounding_record(SCENE_BOX, subset="unique"),
               grounding_record(box(0.5, 5, 1.3, dx=8.0, dy=0.5, dz=1.0), gt_frame=None, subset="unique"),
               grounding_record(box(0.5, 5, 1.3, dx=4.0, dy=0.5, dz=1.0), gt_frame=None, subset="multiple"),
               grounding_record(SCENE_BOX, subset="multiple"),
               grounding_record(SCENE_BOX, gt_frame=None)]
    answer = {"frame": 1, "bbox_3d": CAM_BOX}
    completions = [tagged(answer), fenced(answer), json.dumps(answer), tagged({"frame": 0, "bbox_3d": CAM_BOX}),
                   tagged(answer)]
    m = ev.grounding_metrics(records, completions)
    assert m["acc@0.25"] == pytest.approx(4 / 5) and m["acc@0.5"] == pytest.approx(3 / 5)
    assert m["mean_iou"] == pytest.approx((1 + 0.25 + 0.5 + 0 + 1) / 5)
    assert m["subsets"]["unique"] == {"num_samples": 2, "acc@0.25": 1.0, "acc@0.5": 0.5,
                                      "mean_iou": pytest.approx(0.625)}
    assert m["subsets"]["multiple"] == {"num_samples": 2, "acc@0.25": 0.5, "acc@0.5": 0.5,
                                        "mean_iou": pytest.approx(0.25)}
    assert m["frame_acc"] == 0.5 and m["frame_samples"] == 2  # frame 1 right, frame 0 wrong; 3 without a frame
    assert m["format_rate"] == pytest.approx(3 / 5)  # strict: the fenced and the plain answer are not R_format 1
    rows = ev.summary({"grounding": m})
    assert rows["grounding/Acc@0.25 unique"] == 1.0 and rows["grounding/Acc@0.5 multiple"] == 0.5
    # no record with a frame: frame accuracy is None and leaves the table; no subset labels: no split
    plain = ev.grounding_metrics(records[4:], completions[4:])
    assert plain["frame_acc"] is None and plain["subsets"] == {} and plain["acc@0.5"] == 1.0
    assert "grounding/frame acc" not in ev.summary({"grounding": plain})
    assert ev.grounding_subset({"eval_type": "Unique"}) == "unique" and ev.grounding_subset({}) is None


# ----------------------------------------------------------------------------- spatial (VSI-Bench)

def spatial(qtype, answer):
    return {"task": "spatial", "question_type": qtype, "answer": answer}


def test_vsi_overall_merges_rel_direction():
    records = [spatial("object_counting", "3"), spatial("object_rel_direction_easy", "A"),
               spatial("object_rel_direction_medium", "B"), spatial("object_rel_direction_hard", "C"),
               spatial("object_rel_direction_hard", "D")]
    completions = [tagged("3"), tagged("A"), tagged("A"), tagged("C"), tagged("A")]
    m = ev.spatial_metrics(records, completions)
    # per type: counting 1, easy 1, medium 0, hard 1/2. Unmerged: (1 + 1 + 0 + 0.5) / 4 = 0.625;
    # VSI-Bench: rel_direction = (1 + 0 + 0.5) / 3 = 0.5, overall (1 + 0.5) / 2 = 0.75
    assert m["overall"] == pytest.approx(0.75)
    assert mean_of(m["rel_direction_parts"]) == pytest.approx(0.5)
    assert list(m["per_type"]) == ["object_counting", "object_rel_direction"]
    assert m["per_type"]["object_rel_direction"] == {"metric": "accuracy", "score": pytest.approx(0.5),
                                                     "num_samples": 4}
    assert set(m["rel_direction_parts"]) == {"object_rel_direction_easy", "object_rel_direction_medium",
                                             "object_rel_direction_hard"}
    unmerged = [v["score"] for v in {**m["rel_direction_parts"], "object_counting": m["per_type"]["object_counting"]}.values()]
    assert sum(unmerged) / len(unmerged) == pytest.approx(0.625)
    assert "spatial/object_rel_direction (accuracy)" in ev.summary({"spatial": m})


def mean_of(per_type: dict) -> float:
    return sum(v["score"] for v in per_type.values()) / len(per_type)


def test_vsi_matching_rules():
    mc, num = spatial("object_rel_distance", "A"), spatial("object_counting", "5")
    s = ev.spatial_score
    assert [s(tagged(a), mc) for a in ("A", "a", "A.", "A. sofa", "A sofa", "(A)", "A)", "A:", "B")] == \
        [1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert s("A", mc) == 1.0 and s("```\nA\n```", mc) == 1.0  # VG LLM / zero-shot: no tags
    # MRA over VSI-Bench's float thresholds: 4 for 5 is 0.6 (the reward, with slack, gives 0.7)
    assert s(tagged("4"), num) == pytest.approx(0.6) and rewards.mra(4, 5) == pytest.approx(0.7)
    assert s(tagged("5 chairs"), num) == 1.0 and s(tagged("5chairs"), num) == 0.0
    assert s(tagged("five"), num) == 0.0 and s(tagged("nan"), num) == 0.0
    assert ev.vsi_mra(3.0, 4.0) == pytest.approx(0.6) and ev.vsi_mra(0.0, 0.0) == 1.0
    assert len(ev.VSI_MRA_THRESHOLDS) == 10


# ----------------------------------------------------------------------------- untagged answers, truncation

def test_fenced_and_plain_answers_score_like_the_tagged_form():
    gt = [{"label": "chair", "bbox_3d": box(0, 0, 2)}, {"label": "table", "bbox_3d": box(2, 0, 4, dx=2.0)}]
    det = [{"task": "detection", "boxes": gt}] * 2
    pred = [gt[0], {"label": "table", "bbox_3d": box(2, 0, 4)}]  # the table at IoU 1/2
    ground = [grounding_record(SCENE_BOX), grounding_record(box(0.5, 5, 1.3, dx=4.0, dy=0.5, dz=1.0))]
    g_answer = {"frame": 1, "bbox_3d": CAM_BOX}
    sp = [spatial("object_counting", "4"), spatial("object_rel_distance", "B")]
    cases = [("detection", det, [pred, pred[:1]]), ("grounding", ground, [g_answer, g_answer]),
             ("spatial", sp, ["3", "B"])]
    def plain(answer):
        return answer if isinstance(answer, str) else json.dumps(answer)

    def without_format(metrics):
        return {k: v for k, v in metrics.items() if k != "format_rate"}

    for task, records, answers in cases:
        ref = ev.score(task, records, [tagged(a) for a in answers])
        assert ref["format_rate"] == 1.0
        for style in (fenced, plain):
            got = ev.score(task, records, [style(a) for a in answers])
            assert got["format_rate"] == 0.0, task  # R_format stays strict
            assert without_format(got) == without_format(ref), task


def test_truncated_share():
    records = [spatial("object_counting", "4")] * 4
    completions = [tagged("4")] * 4
    assert ev.score("spatial", records, completions)["truncated"] is None
    m = ev.score("spatial", records, completions, truncated=[True, False, False, True])
    assert m["truncated"] == 0.5 and ev.summary({"spatial": m})["spatial/truncated"] == 0.5
    assert "spatial/truncated" not in ev.summary({"spatial": ev.score("spatial", records, completions)})
    det = ev.score("detection", [{"task": "detection", "boxes": []}], [tagged([])], truncated=[True])
    assert det["truncated"] == 1.0
    with pytest.raises(ValueError, match="4 records but 3 truncation flags"):
        ev.score("spatial", records, completions, truncated=[True] * 3)
