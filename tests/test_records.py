"""Tests of the record check shared by every script ("Nothing lost, nothing silent").

A hostile matrix: each bad record, second of three in a file (JSON lines or a JSON array), is
one RecordError / FileNotFoundError of one line naming the file and line (or [index]) and what
is wrong; with skip_bad it is left out and counted, and the good ones load.
"""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

import data
import model

FRAMES = 2  # frames per record; 56 x 56 pixels -> a 4 x 4 patch grid


def good_record(r: int) -> dict:
    """A valid detection record of the project's own format with a (2, 4, 4, 4) geometry prior."""
    boxes = [{"label": "chair", "bbox_3d": [1.0, 0.0, 2.0 + r, 0.5, 0.8, 0.5, 0.0, 0.0, 0.3]}]
    return {"id": f"r{r}", "task": "detection", "images": [f"frames/{r}_{i}.png" for i in range(FRAMES)],
            "geometry": f"geometry/{r}.npy", "boxes": boxes,
            "conversations": [{"from": "human", "value": data.detection_prompt(FRAMES)},
                              {"from": "gpt", "value": data.detection_answer(boxes)}]}


def write_files(folder, n: int = 3) -> None:
    """The frames and geometry files the good records name."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "frames"), exist_ok=True)
    os.makedirs(os.path.join(folder, "geometry"), exist_ok=True)
    for r in range(n):
        for i in range(FRAMES):
            Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(os.path.join(folder, f"frames/{r}_{i}.png"))
        np.save(os.path.join(folder, f"geometry/{r}.npy"), rng.normal(size=(FRAMES, 4, 4, 4)).astype(np.float32))


def write_records(folder, records: list, fmt: str) -> str:
    """JSON lines (detection.jsonl) or an indented JSON array (detection.json) of the records."""
    if fmt == "jsonl":
        path = os.path.join(folder, "detection.jsonl")
        with open(path, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    else:
        path = os.path.join(folder, "detection.json")
        with open(path, "w") as f:
            json.dump(records, f, indent=2)
    return path


# ----------------------------------------------------------------------------- the hostile matrix
# Each case spoils the record it is given (and may write a bad file); the pattern is what the
# message must say after "<file>:2: " (or "<file>[1]: ").

def set_box(value):
    return lambda rec, folder: rec["boxes"][0].__setitem__("bbox_3d", value)


def set_key(key, value):
    return lambda rec, folder: rec.__setitem__(key, value)


def bad_image(name: str, write):
    """Point the record's first image at a file that `write(path)` makes."""
    def spoil(rec, folder):
        path = os.path.join(folder, "frames", name)
        write(path)
        rec["images"][0] = f"frames/{name}"
    return spoil


def corrupt_png(path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF  # inside the pixel data: the header still opens, the CRC fails
    open(path, "wb").write(bytes(raw))


def bad_geometry(array):
    def spoil(rec, folder):
        np.save(os.path.join(folder, "geometry", "bad.npy"), array)
        rec["geometry"] = "geometry/bad.npy"
    return spoil


BOX = [1.0, 0.0, 2.0, 0.5, 0.8, 0.5, 0.0, 0.0, 0.3]
NAN_GEOMETRY = np.zeros((FRAMES, 4, 4, 4), np.float32)
NAN_GEOMETRY[1, 2, 3, 0] = np.nan

HOSTILE = {
    "8-number box": (set_box(BOX[:8]), r"boxes\[0\]\.bbox_3d has 8 numbers, need 9"),
    "string box": (set_box("1 0 2 .5 .8 .5 0 0 .3"), r"boxes\[0\]\.bbox_3d must be a list of 9 numbers .* got a string"),
    "string number": (set_box(BOX[:2] + ["2.0"] + BOX[3:]), r"boxes\[0\]\.bbox_3d\[2\] is '2\.0', not a number"),
    "NaN": (set_box([math.nan] + BOX[1:]), r"boxes\[0\]\.bbox_3d\[0\] is nan \(not finite\)"),
    "Infinity": (set_box(BOX[:2] + [math.inf] + BOX[3:]), r"boxes\[0\]\.bbox_3d\[2\] is inf \(not finite\)"),
    "negative size": (set_box(BOX[:4] + [-0.8] + BOX[5:]), r"bbox_3d\[4\] \(a size\) is -0\.8; sizes must be > 0"),
    "integer label": (lambda rec, folder: rec["boxes"][0].__setitem__("label", 7), r"boxes\[0\]\.label is 7 \(int\)"),
    "boxes null": (set_key("boxes", None), r"'boxes' must be a list of \{label, bbox_3d\}, got null"),
    "boxes a string": (set_key("boxes", "chair"), r"'boxes' must be a list .* got a string"),
    "missing image": (lambda rec, folder: rec["images"].__setitem__(1, "frames/nope.png"), r"image not found: .*nope\.png"),
    "directory as image": (lambda rec, folder: rec["images"].__setitem__(0, "frames"), r"image .*frames is a directory"),
    "text file as image": (bad_image("note.png", lambda p: open(p, "w").write("not a picture\n")),
                           r"image .*note\.png is not a readable image"),
    "corrupt PNG": (bad_image("corrupt.png", corrupt_png), r"image .*corrupt\.png is not a readable image"),
    "3x3 image": (bad_image("tiny.png", lambda p: Image.new("RGB", (3, 3)).save(p)),
                  r"image .*tiny\.png is 3 x 3 pixels; each side must be >= 28"),
    "geometry wrong shape": (bad_geometry(np.zeros((FRAMES, 4, 4), np.float32)),
                             r"geometry .*bad\.npy has shape \(2, 4, 4\); it must be \(frames, Hp, Wp, C\)"),
    "geometry wrong frames": (bad_geometry(np.zeros((3, 4, 4, 4), np.float32)), r"geometry .*bad\.npy has 3 frames for 2 images"),
    "NaN geometry": (bad_geometry(NAN_GEOMETRY), r"geometry .*bad\.npy holds non-finite values"),
    "missing geometry": (set_key("geometry", "geometry/none.npy"), r"geometry not found: .*none\.npy"),
}


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_record_is_one_line_naming_file_and_line(tmp_path, case, fmt):
    spoil, pattern = HOSTILE[case]
    write_files(str(tmp_path))
    records = [good_record(r) for r in range(3)]
    spoil(records[1], str(tmp_path))
    path = write_records(str(tmp_path), records, fmt)
    place = f"{path}:2" if fmt == "jsonl" else f"{path}[1]"
    with pytest.raises((data.RecordError, FileNotFoundError)) as e:
        data.load_records_checked(path)
    message = str(e.value)
    assert message.startswith(place + ": ") and "\n" not in message
    assert __import__("re").search(pattern, message), message
    # With skip_bad the bad record is left out and counted; the good ones load.
    kept, skipped = data.load_records_checked(path, skip_bad=True)
    assert [r["id"] for r in kept] == ["r0", "r2"] and skipped == [message]
    assert data.load_records(path, skip_bad=True, check_files=True).skipped == [message]


def test_good_records_pass_every_check(tmp_path):
    write_files(str(tmp_path))
    path = write_records(str(tmp_path), [good_record(r) for r in range(3)], "jsonl")
    records, skipped = data.load_records_checked(path)
    assert skipped == [] and len(records) == 3
    assert records[0]["_where"] == f"{path}:1"
    assert os.path.isabs(records[0]["images"][0]) and os.path.isabs(records[0]["geometry"])


def test_structure_is_checked_without_opening_files(tmp_path):
    """load_records (check_files=False) still refuses a bad box, but not a missing image."""
    records = [good_record(0), good_record(1)]
    records[1]["boxes"][0]["label"] = 3
    path = write_records(str(tmp_path), records, "jsonl")  # no image or geometry file exists
    with pytest.raises(data.RecordError, match=r"detection\.jsonl:2: boxes\[0\]\.label is 3"):
        data.load_records(path)
    assert len(data.load_records(path, limit=1)) == 1


def test_grounding_and_spatial_values_are_checked(tmp_path):
    pose = np.eye(4).tolist()
    grounding = {"task": "grounding", "images": ["a.png", "b.png"], "gt_bbox": BOX, "gt_frame": 2,
                 "cam2global": [pose, pose], "axis_align_matrix": pose,
                 "conversations": [{"from": "human", "value": data.grounding_prompt(2, "a chair")},
                                   {"from": "gpt", "value": "{}"}]}
    spatial = {"task": "spatial", "images": ["a.png"], "question_type": "object_counting", "answer": 3,
               "conversations": [{"from": "human", "value": data.spatial_prompt(1, "How many?")},
                                 {"from": "gpt", "value": "3"}]}
    cases = [(grounding, r"gt_frame is 2; it must be a frame index 0\.\.1 or null"),
             (dict(grounding, gt_frame=None, axis_align_matrix=[[1, 0], [0, 1]]), r"axis_align_matrix must be a 4x4 matrix"),
             (dict(grounding, gt_frame=None, cam2global=[pose]), r"'cam2global' needs one 4x4 pose per image"),
             (dict(grounding, gt_frame=0, gt_bbox=BOX[:3] + [0.0] + BOX[4:]), r"gt_bbox\[3\] \(a size\) is 0\.0"),
             (spatial, r"answer must be a string, got int")]
    for record, pattern in cases:
        path = tmp_path / f"{record['task']}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(data.RecordError, match=rf"{record['task']}\.jsonl:1: {pattern}"):
            data.load_records(str(path))
    # A grounding record without a ground-truth frame (ScanRefer val) is valid.
    path = tmp_path / "grounding.jsonl"
    path.write_text(json.dumps(dict(grounding, gt_frame=None)) + "\n")
    assert data.load_records(str(path))[0]["gt_frame"] is None


def test_file_level_problems(tmp_path):
    path = tmp_path / "records.json"
    path.write_text('[\n  {"task": "detection",\n  oops\n]')
    with pytest.raises(data.RecordError, match=r"records\.json:3: not valid JSON"):
        data.load_records(str(path))
    # Every record bad: skip_bad still ends in one line, with the first reason.
    path = tmp_path / "detection.jsonl"
    path.write_text('{"task": "detection", "boxes": null}\n{not json\n')
    with pytest.raises(data.RecordError, match=r"detection\.jsonl: no records \(2 bad; the first: .*:1: detection record lacks"):
        data.load_records(str(path), skip_bad=True)
    with pytest.raises(FileNotFoundError, match="media root not found"):
        data.load_records(str(path), media_root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- sequence lengths

def test_check_lengths_counts_like_collate_and_names_the_record(tmp_path):
    net, tokenizer, cfg = model.load_model("toy")
    write_files(str(tmp_path))
    path = write_records(str(tmp_path), [good_record(r) for r in range(3)], "jsonl")
    records, _ = data.load_records_checked(path)
    batch = data.collate(records, tokenizer, cfg)
    lengths = [data.sequence_length(r, tokenizer, cfg) for r in records]
    assert lengths == batch["attention_mask"].sum(1).tolist()
    # Visual tokens from the header alone: 56 x 56 -> 4 x 4 patches -> 4 tokens per frame.
    assert data.visual_tokens(56, 56, cfg) == 4
    kept, dropped = data.check_lengths(records, tokenizer, cfg, max(lengths))
    assert len(kept) == 3 and dropped == []
    with pytest.raises(data.RecordError, match=rf"detection\.jsonl:1: {lengths[0]} tokens .* do not fit max_seq_len 10"):
        data.check_lengths(records, tokenizer, cfg, 10)
    kept, dropped = data.check_lengths(records, tokenizer, cfg, 10, skip_bad=True)
    assert kept == [] and len(dropped) == 3 and all("\n" not in m for m in dropped)
    # GRPO / eval: the prompt plus a completion budget instead of the SFT answer.
    prompt_only = data.sequence_length(records[0], tokenizer, cfg, completion_tokens=0)
    assert prompt_only == data.collate(records[:1], tokenizer, cfg, with_answer=False)["input_ids"].shape[1]


def test_check_lengths_checks_the_geometry_grid(tmp_path):
    _, tokenizer, cfg = model.load_model("toy")
    write_files(str(tmp_path))
    np.save(tmp_path / "geometry" / "1.npy", np.zeros((FRAMES, 8, 8, 4), np.float32))  # grid of 112 x 112 frames
    path = write_records(str(tmp_path), [good_record(r) for r in range(3)], "jsonl")
    records, _ = data.load_records_checked(path)
    with pytest.raises(data.RecordError, match=r"detection\.jsonl:2: geometry grid \(8, 8\) does not match the image patch grid \(4, 4\)"):
        data.check_lengths(records, tokenizer, cfg, 10_000)


def test_decoded_files_are_cached_read_only_bounded_and_reread_when_changed(tmp_path, monkeypatch):
    """data.cached_arrays: a second read of one file version decodes nothing; a changed file is
    decoded again; arrays are read-only (shared by every caller); the cache stays in its budget."""
    monkeypatch.setattr(data, "_FILE_CACHE", type(data._FILE_CACHE)())
    monkeypatch.setattr(data, "_file_cache_bytes", 0)
    frame = np.zeros((28, 28, 3), dtype=np.uint8)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(frame + i).save(paths[-1])
    first = data.read_image(paths[0])
    assert data.read_image(paths[0]) is first and not first.flags.writeable
    with pytest.raises(ValueError):
        first[0, 0, 0] = 1
    Image.fromarray(frame + 9).save(paths[0])
    os.utime(paths[0], ns=(1, 1))  # another version of the file: another mtime
    assert data.read_image(paths[0])[0, 0, 0] == 9
    monkeypatch.setattr(data, "FILE_CACHE_BYTES", 2 * frame.nbytes)  # room for two frames
    for path in paths:
        data.read_image(path)
    assert data._file_cache_bytes <= 2 * frame.nbytes and len(data._FILE_CACHE) == 2
    assert [key[1] for key in data._FILE_CACHE] == paths[1:]  # the least recently used went first
    with pytest.raises(FileNotFoundError, match="image not found"):
        data.read_image(str(tmp_path / "missing.png"))
