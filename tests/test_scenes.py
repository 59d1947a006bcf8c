"""Tests of the synthetic 3D world (scenes.py): determinism, record format, geometry, ground truth."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

import boxes
import data
import scenes

TRAIN_SCENES, VAL_SCENES = 3, 2


# ---------------------------------------------------------------------------------------------
# Fixtures: one small data set generated once for the whole module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("toy"))
    scenes.generate(out, "train", TRAIN_SCENES)
    scenes.generate(out, "val", VAL_SCENES)
    return out


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def records(toy: str, split: str, task: str) -> list[dict]:
    return read_jsonl(os.path.join(toy, split, f"{task}.jsonl"))


def scene_json(toy: str, split: str, scene_id: str) -> dict:
    with open(os.path.join(toy, split, "scenes", scene_id, "scene.json")) as f:
        return json.load(f)


def scene_objects(summary: dict) -> list[scenes.SceneObject]:
    return [scenes.SceneObject(o["category"], np.array(o["center"]), np.array(o["size_whd"]),
                               o["heading"]) for o in summary["objects"]]


def to_camera(points_first: np.ndarray, poses: list, f: int) -> np.ndarray:
    """Points in the first frame's camera -> frame f's camera."""
    t = np.linalg.inv(np.asarray(poses[f])) @ np.asarray(poses[0])
    return points_first @ t[:3, :3].T + t[:3, 3]


def all_files(root: str) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# ---------------------------------------------------------------------------------------------
# Determinism and splits
# ---------------------------------------------------------------------------------------------


def test_generation_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    scenes.generate(a, "val", 2)
    scenes.generate(b, "val", 2)
    files_a, files_b = all_files(a), all_files(b)
    assert files_a.keys() == files_b.keys() and len(files_a) > 10
    assert all(files_a[k] == files_b[k] for k in files_a)


def test_train_and_val_scenes_are_disjoint(toy):
    ids = {split: {r["scene_id"] for task in data.TASKS for r in records(toy, split, task)}
           for split in ("train", "val")}
    assert len(ids["train"]) == TRAIN_SCENES and len(ids["val"]) == VAL_SCENES
    assert not ids["train"] & ids["val"]


# ---------------------------------------------------------------------------------------------
# Record format
# ---------------------------------------------------------------------------------------------

COMMON_KEYS = {"id", "task", "scene_id", "images", "geometry", "conversations", "cam2img",
               "cam2global", "axis_align_matrix"}
TASK_KEYS = {"detection": {"boxes"},
             "grounding": {"target", "description", "gt_frame", "gt_bbox"},
             "spatial": {"question_type", "answer", "options"}}
NUM_FRAMES = {"detection": scenes.DETECTION_FRAMES, "grounding": scenes.GROUNDING_FRAMES,
              "spatial": scenes.SPATIAL_FRAMES}


@pytest.mark.parametrize("task", data.TASKS)
def test_records_parse_and_have_all_keys(toy, task):
    recs = records(toy, "train", task)
    assert recs
    loaded = data.load_records(os.path.join(toy, "train"), task)    # the project's own loader
    assert len(loaded) == len(recs)
    for r in recs:
        assert COMMON_KEYS | TASK_KEYS[task] <= r.keys()
        assert r["task"] == task and len(r["images"]) == NUM_FRAMES[task]
        assert len(r["cam2global"]) == len(r["images"])
        assert np.asarray(r["cam2img"]).shape == (4, 4)
        assert np.allclose(r["axis_align_matrix"], np.eye(4))
        human, gpt = r["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        if task == "detection":
            assert human["value"] == data.detection_prompt(4)
            assert gpt["value"] == data.detection_answer(r["boxes"])
        elif task == "grounding":
            assert human["value"] == data.grounding_prompt(scenes.GROUNDING_FRAMES, r["description"])
            assert json.loads(gpt["value"])["frame"] == r["gt_frame"]
        else:
            assert human["value"] == data.spatial_prompt(8, r["question"], r["options"] or None)
            assert gpt["value"] == r["answer"]
    assert len({r["id"] for r in recs}) == len(recs)


def test_images_exist_with_the_right_size(toy):
    for task in data.TASKS:
        for r in records(toy, "train", task):
            for rel in r["images"]:
                with Image.open(os.path.join(toy, "train", rel)) as image:
                    assert image.size == (112, 112) and image.mode == "RGB"
                assert os.path.isfile(os.path.join(toy, "train", rel.replace("/frames/", "/depth/")))


# ---------------------------------------------------------------------------------------------
# Ground truth geometry
# ---------------------------------------------------------------------------------------------


def test_detection_box_centres_project_inside_an_image(toy):
    for r in records(toy, "train", "detection"):
        k = np.asarray(r["cam2img"])
        labels = [b["label"] for b in r["boxes"]]
        assert set(labels) <= set(scenes.CATEGORY_NAMES)
        keys = [(b["label"], np.linalg.norm(b["bbox_3d"][:3])) for b in r["boxes"]]
        assert keys == sorted(keys)                                    # by label, then nearest first
        for box in r["boxes"]:
            inside = False
            for f in range(len(r["images"])):
                c = to_camera(np.array([box["bbox_3d"][:3]]), r["cam2global"], f)[0]
                if c[2] > 0:
                    u, v = scenes.project(c[None], k)[0]
                    inside |= bool(0 <= u < 112 and 0 <= v < 112)
            assert inside, (r["id"], box)


def test_objects_do_not_overlap_and_stay_in_the_room(toy):
    for split, count in (("train", TRAIN_SCENES), ("val", VAL_SCENES)):
        scene_ids = sorted({r["scene_id"] for r in records(toy, split, "detection")})
        assert len(scene_ids) == count
        for sid in scene_ids:
            summary = scene_json(toy, split, sid)
            objs = summary["objects"]
            assert scenes.NUM_OBJECTS[0] <= len(objs) <= scenes.NUM_OBJECTS[1]
            cats = [o["category"] for o in objs]
            assert max(cats.count(c) for c in cats) <= 2
            w, l = summary["room"]["width"], summary["room"]["length"]
            for o in objs:
                corners = boxes.box_corners(o["bbox_3d"])
                assert (np.abs(corners[:, 0]) <= w / 2 + 1e-6).all()
                assert (np.abs(corners[:, 1]) <= l / 2 + 1e-6).all()
                assert corners[:, 2].min() == pytest.approx(0.0, abs=1e-6)    # on the floor
                assert abs(o["heading"]) <= math.pi / 4 + 1e-9
            for i in range(len(objs)):
                for j in range(i + 1, len(objs)):
                    assert boxes.box3d_iou(objs[i]["bbox_3d"], objs[j]["bbox_3d"]) == 0.0


def test_level_camera_sees_upright_object_with_identity_rotation():
    obj = scenes.SceneObject("chair", np.array([0.0, 2.0, 0.45]), np.array([0.5, 0.9, 0.6]), 0.0)
    level = scenes.pose_matrix(scenes.camera_rotation(0.0, 0.0), np.array([0.0, 0.0, 0.45]))
    box = scenes.camera_box(obj, level)
    assert np.allclose(box, [0, 0, 2.0, 0.5, 0.9, 0.6, 0, 0, 0], atol=1e-9)
    # Tilted down by t and an object turned by h: yaw 0, roll t, pitch = -h (camera heading 0).
    obj.heading = 0.3
    tilted = scenes.pose_matrix(scenes.camera_rotation(0.0, 0.4), np.array([0.0, 0.0, 1.5]))
    yaw, roll, pitch = scenes.camera_box(obj, tilted)[6:]
    assert (yaw, roll, pitch) == pytest.approx((0.0, 0.4, -0.3), abs=1e-9)
    # Same 8 corners as the scene-frame box mapped into the camera.
    world_in_cam = boxes.transform_box(obj.world_box(), np.linalg.inv(tilted))
    assert boxes.box3d_iou(world_in_cam, scenes.camera_box(obj, tilted)) == pytest.approx(1.0, abs=1e-6)


def test_rendered_objects_lie_inside_their_projected_boxes():
    scene, frames = scenes.build_scene(11)
    checked = 0
    for i, frame in frames.items():
        for n, obj in enumerate(scene.objects):
            corners = boxes.box_corners(scenes.camera_box(obj, scene.poses[i]))
            mask = frame.inst == n
            if mask.sum() < scenes.MIN_PIXELS or (corners[:, 2] <= 0.1).any():
                continue
            uv = scenes.project(corners, scene.cam2img)
            rows, cols = np.nonzero(mask)
            assert cols.min() + 0.5 >= uv[:, 0].min() - 1 and cols.max() + 0.5 <= uv[:, 0].max() + 1
            assert rows.min() + 0.5 >= uv[:, 1].min() - 1 and rows.max() + 0.5 <= uv[:, 1].max() + 1
            # The z-depth of the object's pixels lies between its nearest and farthest corner.
            z = frame.depth[mask]
            assert z.min() >= corners[:, 2].min() - 1e-4 and z.max() <= corners[:, 2].max() + 1e-4
            checked += 1
    assert checked >= 5


def test_geometry_prior_shapes_and_values(toy):
    for task in data.TASKS:
        for r in records(toy, "train", task):
            geo = np.load(os.path.join(toy, "train", r["geometry"]))
            assert geo.dtype == np.float32 and geo.shape == (len(r["images"]), 8, 8, 4)
            assert np.all(geo[..., 3] == 1)  # homogeneous coordinate
            # Back in frame f's own camera, the z of each patch point is the patch's mean depth.
            for f, rel in enumerate(r["images"]):
                depth = np.asarray(Image.open(os.path.join(
                    toy, "train", rel.replace("/frames/", "/depth/"))), dtype=np.float64) / 1000.0
                z_patch = depth.reshape(8, 14, 8, 14).mean(axis=(1, 3))
                z_geo = to_camera(geo[f, ..., :3].reshape(-1, 3).astype(np.float64), r["cam2global"], f)[:, 2]
                assert np.allclose(z_geo.reshape(8, 8), z_patch, atol=2e-3)


def test_geometry_point_at_a_box_centre_is_near_the_box(toy):
    checked = 0
    for r in records(toy, "train", "detection"):
        geo = np.load(os.path.join(toy, "train", r["geometry"]))
        for box in r["boxes"]:
            centre = np.array(box["bbox_3d"][:3])
            if centre[2] <= 0:
                continue
            u, v = scenes.project(centre[None], np.asarray(r["cam2img"]))[0]
            if not (0 <= u < 112 and 0 <= v < 112):
                continue
            pu, pv = int(u) // 14, int(v) // 14
            near = geo[0, max(pv - 1, 0):pv + 2, max(pu - 1, 0):pu + 2, :3].reshape(-1, 3)
            radius = np.linalg.norm(box["bbox_3d"][3:6]) / 2
            assert np.linalg.norm(near - centre, axis=1).min() < radius + 0.5, (r["id"], box)
            checked += 1
    assert checked >= 5


# ---------------------------------------------------------------------------------------------
# Grounding
# ---------------------------------------------------------------------------------------------


def test_grounding_descriptions_are_unique_and_frames_in_range(toy):
    for split in ("train", "val"):
        recs = records(toy, split, "grounding")
        by_scene: dict[str, list[dict]] = {}
        for r in recs:
            by_scene.setdefault(r["scene_id"], []).append(r)
        for sid, scene_recs in by_scene.items():
            descs = [r["description"] for r in scene_recs]
            assert len(set(descs)) == len(descs)
            summary = scene_json(toy, split, sid)
            objs = scene_objects(summary)
            for r in scene_recs:
                matches = scenes.resolve_description(r["description"], objs)
                assert len(matches) == 1
                target = summary["objects"][matches[0]]
                assert target["category"] == r["target"]
                assert target["bbox_3d"] == r["gt_bbox"]
                assert 0 <= r["gt_frame"] < len(r["images"])


def test_descriptions_of_a_pair_use_clear_differences():
    big = scenes.SceneObject("chair", np.array([0.0, 0.0, 0.5]), np.array([0.6, 1.0, 0.6]), 0.0)
    small = scenes.SceneObject("chair", np.array([2.0, 0.0, 0.4]), np.array([0.45, 0.8, 0.45]), 0.0)
    sofa = scenes.SceneObject("sofa", np.array([0.0, 1.5, 0.4]), np.array([1.5, 0.8, 0.9]), 0.0)
    objs = [big, small, sofa]
    assert scenes.resolve_description("the larger chair", objs) == [0]
    assert scenes.resolve_description("the shorter chair", objs) == [1]
    assert scenes.resolve_description("the chair closest to the sofa", objs) == [0]
    assert scenes.resolve_description("the chair farthest from the sofa", objs) == [1]
    assert scenes.resolve_description("the sofa", objs) == [2]
    twin = scenes.SceneObject("chair", np.array([2.0, 0.0, 0.5]), np.array([0.6, 1.0, 0.6]), 0.0)
    assert scenes.resolve_description("the larger chair", [big, twin]) == [0, 1]     # ambiguous
    descs = scenes.describe_objects(objs, np.random.default_rng(0))
    assert len(set(descs.values())) == 3


def test_grounding_answer_maps_back_to_the_gt_box(toy):
    for r in records(toy, "train", "grounding"):
        answer = json.loads(r["conversations"][1]["value"])
        to_scene = np.asarray(r["axis_align_matrix"]) @ np.asarray(r["cam2global"][answer["frame"]])
        in_scene = boxes.transform_box(answer["bbox_3d"], to_scene)
        assert boxes.box3d_iou(in_scene, r["gt_bbox"]) > 0.9, r["id"]


# ---------------------------------------------------------------------------------------------
# Spatial QA
# ---------------------------------------------------------------------------------------------


def test_spatial_answers_are_consistent(toy):
    types = set()
    for split in ("train", "val"):
        for r in records(toy, split, "spatial"):
            summary = scene_json(toy, split, r["scene_id"])
            objs = {o["category"]: o for o in summary["objects"]}
            cats = [o["category"] for o in summary["objects"]]
            qtype, q, answer = r["question_type"], r["question"], r["answer"]
            types.add(qtype)
            if qtype in data.MC_QUESTION_TYPES:
                assert len(r["options"]) >= 2
                letters = [o.split(". ", 1)[0] for o in r["options"]]
                assert letters == list("ABCD"[:len(letters)]) and answer in letters
                continue
            assert qtype in data.NUMERIC_QUESTION_TYPES and r["options"] == []
            if qtype == "object_counting":
                cat = re.search(r"How many (\w+)\(s\)", q).group(1)
                assert answer == str(cats.count(cat))
            elif qtype == "room_size_estimation":
                area = summary["room"]["width"] * summary["room"]["length"]
                assert float(answer) == pytest.approx(area, abs=0.006)
            elif qtype == "object_size_estimation":
                cat = re.search(r"of the (\w+), measured", q).group(1)
                assert cats.count(cat) == 1
                assert int(answer) == round(max(objs[cat]["size_whd"]) * 100)
            elif qtype == "object_abs_distance":
                a, b = re.search(r"between the (\w+) and the (\w+) \(", q).groups()
                d = np.linalg.norm(np.subtract(objs[a]["center"], objs[b]["center"]))
                assert float(answer) == pytest.approx(d, abs=0.006)
    assert {"object_counting", "room_size_estimation", "object_size_estimation"} <= types


def test_more_questions_per_type_keep_the_first_round_and_never_repeat_a_wording():
    """--questions-per-type 3: the 1-question records first (the same ones), then more, no wording twice."""
    scene, frames = scenes.build_scene(4)
    one = scenes.scene_records(scene, frames)["spatial"]
    three = scenes.scene_records(scene, frames, questions_per_type=3)["spatial"]
    assert three[:len(one)] == one and len(three) > len(one)
    assert len({r["question"] for r in three}) == len(three)
    counts = {t: sum(r["question_type"] == t for r in three) for t in scenes.QUESTION_BUILDERS}
    assert max(counts.values()) <= 3 and counts["room_size_estimation"] == 1   # a room has one size


def test_rel_distance_answer_is_the_closest_option(toy):
    for split in ("train", "val"):
        for r in records(toy, split, "spatial"):
            if r["question_type"] != "object_rel_distance":
                continue
            objs = {o["category"]: o for o in scene_json(toy, split, r["scene_id"])["objects"]}
            target = re.search(r"closest to the (\w+)\?", r["question"]).group(1)
            names = [o.split(". ", 1)[1] for o in r["options"]]
            dists = [np.linalg.norm(np.subtract(objs[n]["center"], objs[target]["center"]))
                     for n in names]
            assert "ABCD"[int(np.argmin(dists))] == r["answer"]


# ---------------------------------------------------------------------------------------------
# Preview and command line
# ---------------------------------------------------------------------------------------------


def test_preview_writes_a_png(toy, tmp_path):
    out = str(tmp_path / "docs" / "preview.png")
    scenes.main(["preview", "--data", toy, "--out", out, "--scale", "1"])
    with Image.open(out) as image:
        assert image.size == (112 * scenes.DETECTION_FRAMES, 224)


def test_preview_without_data_exits_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="no .*detection.jsonl"):
        scenes.main(["preview", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "p.png")])


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        scenes.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--train-scenes", "--val-scenes", "--quick", "--seed", "--frames",
                 "--workers", "--no-progress", "preview"):
        assert flag in text


def test_questions_per_type_below_one_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit, match="--questions-per-type must be >= 1"):
        scenes.main(["--out", str(tmp_path), "--questions-per-type", "0"])
    assert not os.listdir(tmp_path)   # refused before anything is written
