"""Tests of the published record formats as the upstream files are written (data.load_records_checked).

One fixture per format, built in a tmp folder exactly as upstream lays it out:
- VG LLM detection: an indented JSON array (json.dump(..., indent=2)), image paths relative to
  the media root (data/media/scannet/posed_images/<scene>/<frame>.jpg), the fenced answer.
- VG LLM ScanRefer: val as a JSON array with target null (no ground-truth frame), train as JSON
  lines with target {"frame", "bbox_3d"}.
- VSI-Bench rows (JSON lines) with an options list, and a 12-frame 64 x 48 video encoded with PyAV
  at <media_root>/<dataset>/<scene_name>.mp4.
Each is loaded and turned into a model batch with data.collate and the toy tokenizer.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model
import rewards


@pytest.fixture(scope="module")
def toy():
    # Published records carry no geometry prior: the toy model without its geometry merger.
    return model.load_model("toy", geometry=False)


def write_frame(path: str, value: int, size: tuple[int, int] = (56, 42)) -> None:
    """A flat-coloured JPEG frame (ScanNet's posed_images are JPEGs), `size` = (width, height)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, quality=95)


def assert_batch_matches_lengths(records, toy):
    """collate builds a batch, and check_lengths counts exactly its rows' tokens."""
    net, tokenizer, cfg = toy
    batch = data.collate(records, tokenizer, cfg)
    assert batch["input_ids"].shape == batch["loss_mask"].shape
    assert batch["image_grid_thw"].shape[0] == sum(data.record_num_frames(r) for r in records)
    lengths = [data.sequence_length(r, tokenizer, cfg) for r in records]
    assert lengths == batch["attention_mask"].sum(1).tolist()
    with torch.no_grad():
        logits = net(**batch)
    assert torch.isfinite(logits).all()
    return batch


# ----------------------------------------------------------------------------- VG LLM detection

# VG LLM's detection prompt and answer (its preprocessing, process_threedod.py: create_question_answer).
VG_DET_PROMPT = "<image>\n" * 4 + (
    "Detect the 3D bounding boxes in the camera coordinate system of the first frame.\n"
    'Output a json list where each entry contains the object name in "label" and its 3D bounding box in "bbox_3d".\n'
    "The 3D bounding box format should be [x_center, y_center, z_center, x_size, y_size, z_size, yaw, roll, pitch].")


def vg_det_answer(boxes):
    items = [json.dumps({"label": b["label"], "bbox_3d": [round(v, 2) for v in b["bbox_3d"]]}) for b in boxes]
    return "```json\n[\n\t" + ",\n\t".join(items) + "\n]```"


@pytest.fixture()
def vg_detection(tmp_path):
    """data/media/scannet/posed_images/... and data/evaluation/threedod/scannet/scannet_det_val_4frames.json."""
    media = tmp_path / "data" / "media"
    rows = []
    for r, scene in enumerate(["scene0415_00", "scene0011_00"]):
        images = [f"scannet/posed_images/{scene}/{810 + 30 * i:05d}.jpg" for i in range(4)]
        for i, image in enumerate(images):
            write_frame(str(media / image), 40 * i + r)
        boxes = [{"bbox_3d": [0.6112697, 0.0181311, 0.9051806, 0.2644157, 0.2648672, 0.1474581,
                              -0.6812370, -1.0451510, 2.5103809], "label": "bag", "in_reference": True},
                 {"bbox_3d": [0.01, 0.3, 1.9, 0.5, 0.2, 0.4, 0.1, 0.0, 0.0], "label": "sink", "in_reference": False}]
        rows.append({"conversations": [{"from": "human", "value": VG_DET_PROMPT},
                                       {"from": "gpt", "value": vg_det_answer(boxes)}],
                     "images": images, "boxes": boxes,
                     "cam2img": np.eye(4).tolist(), "cam2global": [np.eye(4).tolist()] * 4,
                     "axis_align_matrix": np.eye(4).tolist()})
    path = tmp_path / "data" / "evaluation" / "threedod" / "scannet" / "scannet_det_val_4frames.json"
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=2)  # as VG LLM writes it: an indented JSON array
    return str(path), str(media), rows


def test_vg_llm_detection_file_loads_and_batches(vg_detection, toy):
    path, media, rows = vg_detection
    records, skipped = data.load_records_checked(path, media_root=media)
    assert skipped == [] and len(records) == 2
    for record, row in zip(records, rows):
        assert record["task"] == "detection" and record["_where"].startswith(path + "[")
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in record["images"])
        # The human turn as VG LLM's loader reads it ("<image>\n" -> "<image>"); our answer text.
        assert record["conversations"][0]["value"] == VG_DET_PROMPT.replace("<image>\n", "<image>")
        assert record["conversations"][1]["value"] == data.detection_answer(row["boxes"])
        assert record["source_answer"] == row["conversations"][1]["value"]
        assert record["boxes"] == row["boxes"] and record["cam2img"] == row["cam2img"]  # passed through
    assert records[1]["id"] == "scannet_det_val_4frames-1"
    assert_batch_matches_lengths(records, toy)


def test_vg_llm_detection_without_media_root_names_the_fix(vg_detection):
    path, _, _ = vg_detection
    with pytest.raises(FileNotFoundError, match=r"scannet_det_val_4frames\.json\[0\]: image not found: .*media root") as e:
        data.load_records_checked(path)
    assert "\n" not in str(e.value)


def test_vg_llm_detection_file_read_as_another_task_is_refused(vg_detection):
    path, media, _ = vg_detection
    with pytest.raises(data.RecordError, match=r"\[0\]: a detection record in a file read as grounding"):
        data.load_records_checked(path, "grounding", media_root=media)


# ----------------------------------------------------------------------------- VG LLM ScanRefer

SCANREFER_PROMPT = ("Localize the first clear frame in the video showing the object described in the text.\n"
                    "Text: {desc}\n"
                    'Output a JSON dictionary with the frame index in "frame" and its 3D bounding box in "bbox_3d" '
                    "in the frame's coordinates.\n")
GT_BBOX = [1.0, 2.0, 0.5, 0.4, 0.5, 0.6, 0.0, 0.0, 0.0]  # axis-aligned scene frame, as VG LLM stores it


def translation(x, y, z):
    pose = np.eye(4)
    pose[:3, 3] = (x, y, z)
    return pose


def scanrefer_row(images, desc, target):
    """One row as VG LLM's convert_scanrefer.py (process_data_item) writes it."""
    prompt = SCANREFER_PROMPT.format(desc=desc)
    human = "".join(f"Frame-{i}: <image>" for i in range(len(images))) + "\n" + prompt
    answer = "" if target is None else f"```json\n\t{json.dumps(target)}\n```"
    return {"images": images,
            "conversations": [{"value": human, "from": "human"}, {"value": answer, "from": "gpt"}],
            "metadata": {"dataset": "scanrefer", "question_type": "unique", "ann_id": "0", "object_id": "5"},
            "target": target, "gt_bbox": GT_BBOX, "prompt": prompt,
            "cam2img": np.eye(4).tolist(),
            "cam2global": [translation(0.5 * i, 0, 0).tolist() for i in range(len(images))],
            "axis_align_matrix": np.eye(4).tolist()}


@pytest.fixture()
def scanrefer(tmp_path):
    media = tmp_path / "media"
    images = [f"scannet/posed_images/scene0011_00/{i * 10:05d}.jpg" for i in range(3)]
    for i, image in enumerate(images):
        write_frame(str(media / image), 60 * i)
    val = tmp_path / "scanrefer_val_32frames.json"
    with open(val, "w") as f:
        json.dump([scanrefer_row(images, "The chair is by the window.", None),
                   scanrefer_row(images, "A brown table.", None)], f, indent=2)
    train = tmp_path / "scanrefer_train_32frames.jsonl"
    target = {"frame": 1, "bbox_3d": [0.5, 2.0, 0.5, 0.4, 0.5, 0.6, 0.0, 0.0, 0.0]}
    train.write_text(json.dumps(scanrefer_row(images, "The chair is by the window.", target)) + "\n")
    return str(val), str(train), str(media), target


def test_scanrefer_val_loads_without_a_frame_and_scores_the_box(scanrefer, toy):
    val, _, media, _ = scanrefer
    records, _ = data.load_records_checked(val, media_root=media)
    assert [r["task"] for r in records] == ["grounding", "grounding"]
    assert all(r["gt_frame"] is None for r in records)  # ScanRefer val: no ground-truth frame
    assert records[0]["description"] == "The chair is by the window."
    assert records[0]["conversations"][1]["value"] == ""
    assert records[0]["conversations"][0]["value"].startswith("Frame-0: <image>Frame-1: <image>Frame-2: <image>Localize")
    # The box still scores: predicted in camera 1 (translated by 0.5 m in x) it is the true box.
    completion = data.wrap_answer(data.grounding_answer(1, [0.5, 2.0, 0.5, 0.4, 0.5, 0.6, 0, 0, 0]))
    assert rewards.grounding_iou_reward(completion, records[0]) == pytest.approx(1.0)
    assert rewards.frame_reward(completion, records[0]) == 0.0  # no frame to compare with
    prompts = data.collate(records, toy[1], toy[2], with_answer=False)
    assert prompts["loss_mask"].sum() == 0
    assert_batch_matches_lengths(records, toy)


def test_scanrefer_train_keeps_its_frame_in_gt_frame(scanrefer, toy):
    _, train, media, target = scanrefer
    (record,) = data.load_records(train, media_root=media, check_files=True)
    assert record["gt_frame"] == 1 and record["target"] == target
    assert record["conversations"][1]["value"] == data.grounding_answer(1, target["bbox_3d"])
    assert_batch_matches_lengths([record], toy)


def test_scanrefer_row_with_only_a_prompt_gets_frame_prefixes(scanrefer):
    val, _, media, _ = scanrefer
    rows = json.load(open(val))
    del rows[0]["conversations"]  # VG LLM's evaluation reads `prompt`, not `conversations`
    with open(val, "w") as f:
        json.dump(rows, f)
    record = data.load_records(val, media_root=media)[0]
    human = record["conversations"][0]["value"]
    assert human == "Frame-0: <image>Frame-1: <image>Frame-2: <image>" + rows[0]["prompt"]


def test_scanrefer_without_camera_matrices_says_where_they_come_from(scanrefer):
    _, train, media, _ = scanrefer
    row = json.loads(open(train).read())
    del row["cam2global"], row["axis_align_matrix"]  # VG LLM's train files without --include_cam_params
    with open(train, "w") as f:
        f.write(json.dumps(row) + "\n")
    with pytest.raises(data.RecordError, match=r"jsonl:1: ScanRefer record lacks \['cam2global', 'axis_align_matrix'\]"):
        data.load_records(train, media_root=media)


def test_scanrefer_bad_target_is_one_line(scanrefer):
    _, train, media, _ = scanrefer
    row = json.loads(open(train).read())
    row["target"] = {"frame": "1", "bbox_3d": GT_BBOX}
    with open(train, "w") as f:
        f.write(json.dumps(row) + "\n")
    with pytest.raises(data.RecordError, match=r"scanrefer_train_32frames\.jsonl:1: target\.frame is '1'"):
        data.load_records(train, media_root=media)


# ----------------------------------------------------------------------------- VSI-Bench

def encode_video(path: str, frames: int = 12, width: int = 64, height: int = 48) -> None:
    """A short MPEG-4 clip whose frame i is flat grey 20 * i (so a decoded frame names its index)."""
    import av  # the tests need PyAV to write the fixture (requirements.txt, "Tests")

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


VSI_ROWS = [
    {"id": 0, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_rel_direction_easy",
     "question": "If I am standing by the sofa and facing the bed, is the lamp to my left or right?",
     "options": ["A. left", "B. right"], "ground_truth": "B"},
    {"id": 1, "dataset": "scannet", "scene_name": "scene0011_00", "question_type": "object_counting",
     "question": "How many chair(s) are in this room?", "options": None, "ground_truth": "3"},
]


@pytest.fixture()
def vsibench(tmp_path):
    media = tmp_path / "vsibench"
    encode_video(str(media / "scannet" / "scene0011_00.mp4"))
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in VSI_ROWS))
    return str(path), str(media)


def test_vsibench_rows_load_as_video_records_and_batch(vsibench, toy):
    path, media = vsibench
    records, _ = data.load_records_checked(path, media_root=media, num_frames=8)
    mc, numeric = records
    indices = data.sample_frame_indices(12, 8)
    for record, row in zip(records, VSI_ROWS):
        assert record["task"] == "spatial" and record["id"] == str(row["id"])
        assert record["video"] == os.path.join(media, "scannet", "scene0011_00.mp4")
        assert record["frame_indices"] == indices and "images" not in record
        assert record["answer"] == row["ground_truth"] == record["conversations"][1]["value"]
    assert mc["conversations"][0]["value"] == data.spatial_prompt(8, VSI_ROWS[0]["question"], VSI_ROWS[0]["options"])
    assert "\nOptions:\nA. left\nB. right\nAnswer with" in mc["conversations"][0]["value"]  # VSI-Bench's layout
    assert numeric["options"] == [] and numeric["conversations"][0]["value"].endswith("\nPlease answer the question using a single word or phrase.")
    # The sampled frames are the right ones: frame i of the clip is grey 20 * i.
    frames = data.record_frames(mc)
    assert [f.shape for f in frames] == [(48, 64, 3)] * 8
    assert np.allclose([f.mean() for f in frames], [20 * i for i in indices], atol=6)
    assert rewards.spatial_reward(data.wrap_answer("B"), mc) == 1.0
    assert rewards.spatial_reward(data.wrap_answer("3"), numeric) == 1.0
    assert_batch_matches_lengths(records, toy)


def test_vsibench_default_shows_all_frames_of_a_short_video(vsibench):
    path, media = vsibench
    record = data.load_records(path, media_root=media)[0]
    assert data.VSI_NUM_FRAMES == 32 and record["frame_indices"] == list(range(12))


def test_vsibench_missing_video_and_unknown_type_are_one_line(vsibench):
    path, media = vsibench
    rows = [dict(VSI_ROWS[0], scene_name="scene9999_00"), dict(VSI_ROWS[1], question_type="object_colour")] + VSI_ROWS
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl:1: video not found: .*scene9999_00\.mp4"):
        data.load_records_checked(path, media_root=media)
    records, skipped = data.load_records_checked(path, media_root=media, skip_bad=True)
    assert len(records) == 2 and len(skipped) == 2
    assert skipped[1].startswith(f"{path}:2: unknown VSI-Bench question_type 'object_colour'")


def test_video_without_pyav_is_one_line_naming_the_install(vsibench, monkeypatch):
    path, media = vsibench
    monkeypatch.setattr(data, "_VIDEO_INFO", {})  # nothing cached: the header must be read
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(data.MissingDependency, match=r"needs PyAV: pip install av") as e:
        data.load_records_checked(path, media_root=media, skip_bad=True)  # never skipped
    assert "\n" not in str(e.value)


def test_parquet_without_pyarrow_says_how_to_convert(tmp_path, monkeypatch):
    path = tmp_path / "test-00000-of-00001.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(data.MissingDependency, match=r"pip install pyarrow.*to_json") as e:
        data.load_records_checked(str(path))
    assert "\n" not in str(e.value)


def test_read_video_frames_samples_a_video_file(vsibench):
    _, media = vsibench
    frames = data.read_video_frames(os.path.join(media, "scannet", "scene0011_00.mp4"), 3)
    assert np.allclose([f.mean() for f in frames], [0, 20 * 6, 20 * 11], atol=6)  # round(linspace(0, 11, 3))


def test_spatial_prompt_joins_with_newlines_as_vsi_bench():
    assert data.spatial_prompt(2, "Which is closer?", ["A. sofa", "B. bed"]) == (
        "<image><image>\nThese are frames of a video.\nWhich is closer?\nOptions:\nA. sofa\nB. bed\n"
        "Answer with the option's letter from the given choices directly.")
    assert data.spatial_prompt(1, "How many?") == (
        "<image>\nThese are frames of a video.\nHow many?\nPlease answer the question using a single word or phrase.")
