"""Data: frame sampling, records, prompts and batching (3D-RFT section 3, "Data"; VG LLM data format).

3D-RFT inherits its data format from VG LLM: a sample is a handful of video frames plus a
conversation, stored as one JSON record. The model answers in text; the ground truth needed by the
verifiable rewards (3D boxes, the target frame, the QA answer) travels in the same record.

A record of the project's own files (one line of `<split>/<task>.jsonl`) looks like:

    {"id": "det-000012-0", "task": "detection",
     "images": ["scenes/000012/frames/003.png", ...],      # paths relative to the jsonl's folder
     "geometry": "geometry/det-000012-0.npy",             # optional: per-patch prior, (F, Hp, Wp, C)
                                                          #   (.npy / .safetensors, or one file per frame)
     "depths": ["scenes/000012/depth/003.png", ...],      # optional: depth maps -> 3D points prior
     "conversations": [{"from": "human", "value": "<image><image>...\nDetect the 3D ..."},
                       {"from": "gpt", "value": "[{\"label\":\"chair\",\"bbox_3d\":[...]}]"}],
     "boxes": [{"label": "chair", "bbox_3d": [x, y, z, dx, dy, dz, yaw, roll, pitch]}],  # detection
     "gt_bbox": [...], "gt_frame": 2, "target": "chair", "description": "...",          # grounding
     "question_type": "object_counting", "answer": "3",                                   # spatial
     "cam2img": 4x4, "cam2global": [4x4 per sampled frame], "axis_align_matrix": 4x4}

Each `<image>` in the human turn stands for one frame, in order. `load_records` also reads the
published files as they are (docs/DESIGN.md, "Records and prompts"): VG LLM's detection and
ScanRefer JSON (an indented array or JSON lines, image paths relative to a media root) and
VSI-Bench rows (question + `<dataset>/<scene_name>.mp4`), and turns every one into the record
above; a video record carries `video` + `frame_indices` in place of `images`. This file is free
of anything specific to the synthetic world: only the data paths change.

Sections: prompt texts -> frame sampling and videos -> the record check -> published formats ->
reading record files -> file checks -> sequence lengths -> images and geometry -> geometry
priors (feature files, resampling to the ViT grid, 3D points from depth) -> batching.
"""
from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

# =====================================================================================
# Prompt texts (exactly the VG LLM / 3D-RFT / VSI-Bench wording, docs/DESIGN.md "Records and prompts")
# =====================================================================================

TASKS = ("detection", "grounding", "spatial")
IMAGE_PLACEHOLDER = "<image>"

DETECTION_PROMPT = (
    "Detect the 3D bounding boxes in the camera coordinate system of the first frame. "
    'Output a json list where each entry contains the object name in "label" and its 3D bounding '
    'box in "bbox_3d". The 3D bounding box format should be [x_center, y_center, z_center, x_size, '
    "y_size, z_size, yaw, roll, pitch]."
)
GROUNDING_PROMPT = (
    "Localize the first clear frame in the video showing the object described in the text. "
    'Text: {desc} Output a JSON dictionary with the frame index in "frame" and its 3D bounding box '
    'in "bbox_3d" in the frame\'s coordinates.'
)
# VSI-Bench's own prompt (thinking-in-space, lmms_eval/tasks/vsibench/utils.py): pre-prompt,
# question, "Options:" block and post-prompt each on their own line, one option per line.
SPATIAL_PREFIX = "These are frames of a video.\n{question}"
SPATIAL_NUMERIC_SUFFIX = "Please answer the question using a single word or phrase."
SPATIAL_MC_SUFFIX = "Options:\n{options}\nAnswer with the option's letter from the given choices directly."

# VSI-Bench question types: numeric ones are scored by MRA, the others are multiple choice.
# VSI-Bench splits object_rel_direction into _easy / _medium / _hard; the toy world asks the
# plain name.
NUMERIC_QUESTION_TYPES = (
    "object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
)
MC_QUESTION_TYPES = (
    "object_rel_distance", "object_rel_direction", "obj_appearance_order", "route_planning",
    "object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
)


# Completion length budget per task (new tokens) for sampling in grpo.py and decoding in eval.py
# when --max-new-tokens is not given: `max_new_tokens(task, real)`.
#
# The toy model (its tokenizer, model.is_toy_tokenizer): DEFAULT_MAX_NEW_TOKENS. A detection
# answer of the toy tokenizer takes ~50 tokens per box (the fixed JSON pieces are single tokens,
# digits are one token each); a grounding answer is one box; a spatial answer is a letter or a
# number plus the four tags.
DEFAULT_MAX_NEW_TOKENS = {"detection": 400, "grounding": 96, "spatial": 32}
# A real checkpoint: the published budgets for the bare answer, lmms-eval's generation_kwargs
# max_new_tokens in LaVi-Lab/VG-LLM 6fbdae6 src/lmms_eval/tasks/threedod/default_yaml (detection,
# ScanNet 4 / 6 frames: 2000), src/lmms_eval/tasks/scanrefer/scanrefer.yaml (100) and
# vision-x-nyu/thinking-in-space 51e089c lmms_eval/tasks/vsibench/vsibench.yaml (VSI-Bench: 16;
# VG LLM's copy of that file says 16 too)...
PUBLISHED_MAX_NEW_TOKENS = {"detection": 2000, "grounding": 100, "spatial": 16}
# ...plus room for the wrapper a checkpoint trained here writes around that answer,
# "<think></think><answer>" before it and "</answer>" after it (`wrap_answer`). Qwen2.5's
# vocabulary has no tokens for these tags: BPE cuts each into a few pieces, the four together
# well under 32 (the published budgets already count the end-of-turn token, as generate's
# max_new_tokens does). So a real budget is the published one + 32: 2032, 132, 48.
ANSWER_WRAPPER_TOKENS = 32


def max_new_tokens(task: str, real: bool) -> int:
    """The default completion budget of `task`: the toy's (real=False), or the published one plus
    ANSWER_WRAPPER_TOKENS for a real checkpoint. Example: max_new_tokens("detection", True) == 2032."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return PUBLISHED_MAX_NEW_TOKENS[task] + ANSWER_WRAPPER_TOKENS if real else DEFAULT_MAX_NEW_TOKENS[task]


def detection_prompt(num_frames: int) -> str:
    """Human turn of a detection sample: one <image> per frame, then the instruction."""
    return IMAGE_PLACEHOLDER * num_frames + "\n" + DETECTION_PROMPT


def grounding_prompt(num_frames: int, description: str) -> str:
    """Human turn of a grounding sample: frames prefixed "Frame-i: " so the answer can name one."""
    frames = "".join(f"Frame-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))
    return frames + GROUNDING_PROMPT.format(desc=description)


def spatial_prompt(num_frames: int, question: str, options: Sequence[str] | None = None) -> str:
    """Human turn of a VSI-Bench question; `options` like ["A. sofa", "B. table"] for MC.

    >>> print(spatial_prompt(1, "Which is closer to the bed?", ["A. sofa", "B. table"]))
    <image>
    These are frames of a video.
    Which is closer to the bed?
    Options:
    A. sofa
    B. table
    Answer with the option's letter from the given choices directly.
    """
    text = IMAGE_PLACEHOLDER * num_frames + "\n" + SPATIAL_PREFIX.format(question=question)
    if options:
        return text + "\n" + SPATIAL_MC_SUFFIX.format(options="\n".join(options))
    return text + "\n" + SPATIAL_NUMERIC_SUFFIX


def format_number(value: float) -> str:
    """Numbers in answers carry 2 decimals, as in VG LLM ("-0.00" is normalised to "0.00")."""
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


def detection_answer(boxes: Sequence[dict]) -> str:
    """The ground-truth answer text: a compact JSON list of {"label", "bbox_3d"} with 2 decimals.

    >>> detection_answer([{"label": "chair", "bbox_3d": [1, 0, 2, .5, .8, .5, 0, 0, 0.3]}])
    '[{"label":"chair","bbox_3d":[1.00,0.00,2.00,0.50,0.80,0.50,0.00,0.00,0.30]}]'
    """
    items = []
    for box in boxes:
        numbers = ",".join(format_number(v) for v in box["bbox_3d"])
        items.append('{"label":' + json.dumps(box["label"]) + ',"bbox_3d":[' + numbers + "]}")
    return "[" + ",".join(items) + "]"


def grounding_answer(frame: int, bbox: Sequence[float]) -> str:
    """The ground-truth grounding answer: {"frame": i, "bbox_3d": [...]} in frame i's camera frame."""
    numbers = ",".join(format_number(v) for v in bbox)
    return '{"frame":' + str(int(frame)) + ',"bbox_3d":[' + numbers + "]}"


# The answer-format tags are ordinary (non-special) tokens: decoding must keep them for the rewards.
FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def wrap_answer(answer: str, think: str = "") -> str:
    """The completion format the rewards check: <think>...</think><answer>...</answer>."""
    return f"<think>{think}</think><answer>{answer}</answer>"


# =====================================================================================
# Frame sampling and videos
# =====================================================================================


def sample_frame_indices(
    num_frames: int, k: int, mode: str = "uniform", stride: int = 1, start: int = 0
) -> list[int]:
    """Which of a video's `num_frames` frames a sample shows.

    mode="uniform": `linspace(0, num_frames - 1, k)` rounded, the VSI-Bench / ScanRefer sampling;
    mode="stride": k consecutive frames `start, start + stride, ...`, the detection sampling.

    >>> sample_frame_indices(10, 4)
    [0, 3, 6, 9]
    >>> sample_frame_indices(10, 3, mode="stride", stride=2, start=1)
    [1, 3, 5]
    """
    if num_frames < 1 or k < 1:
        raise ValueError(f"need num_frames >= 1 and k >= 1, got num_frames={num_frames}, k={k}")
    if mode == "uniform":
        return [int(round(x)) for x in np.linspace(0, num_frames - 1, k)]
    if mode == "stride":
        last = start + (k - 1) * stride
        if start < 0 or stride < 1 or last >= num_frames:
            raise ValueError(f"{k} frames at stride {stride} from {start} do not fit in {num_frames} frames")
        return list(range(start, last + 1, stride))
    raise ValueError(f"unknown frame sampling mode {mode!r} (use 'uniform' or 'stride')")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def list_frame_files(folder: str) -> list[str]:
    """The image files of a frame folder, in name order."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"frame folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return [os.path.join(folder, n) for n in names]


def _import_av(path: str):
    """The PyAV module, or a one-line MissingDependency naming the install command.

    PyAV is the only video decoder that works next to this CPU torch (torchvision cannot be
    installed: docs/DESIGN.md, "Platform facts"), and only video files need it, so it is optional.
    """
    try:
        import av  # optional extra: pip install av
    except ImportError:
        raise MissingDependency(f"reading the video {path} needs PyAV: pip install av "
                                "(or pass a folder of frames)") from None
    return av


def _stat(path: str, kind: str) -> os.stat_result:
    """os.stat of a file a record names; FileNotFoundError / RecordError (a folder) in one line."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{kind} not found: {path}") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecordError(f"{kind} {path} is a directory, not a file")
    return info


def _one_line(error: BaseException) -> str:
    """An exception as one short line: decoders' messages sometimes span lines."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


# (path, mtime, size) -> (frames, height, width): a video's header is read once per process,
# however many questions (VSI-Bench asks ~18 per video) use it. Keyed by mtime so that a file
# replaced in the meantime is read again.
_VIDEO_INFO: dict[tuple, tuple[int, int, int]] = {}


def video_info(path: str) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, from its header (nothing is decoded); cached.

    A container that stores no frame count is counted by demuxing its packets (one compressed
    frame each: still no decoding). Example: a 12-frame 64 x 48 clip -> (12, 48, 64).
    """
    info = _stat(path, "video")
    key = (path, info.st_mtime_ns, info.st_size)
    if key not in _VIDEO_INFO:
        av = _import_av(path)
        try:
            with av.open(path) as container:
                streams = container.streams.video
                stream = streams[0] if streams else None
                frames = 0 if stream is None else stream.frames or sum(
                    1 for packet in container.demux(stream) if packet.size)
                size = (0, 0) if stream is None else (stream.codec_context.height, stream.codec_context.width)
        except Exception as e:  # PyAV's error classes differ between versions: all mean "unreadable"
            raise RecordError(f"video {path} is not readable ({_one_line(e)})") from None
        if stream is None or frames < 1:
            raise RecordError(f"video {path} holds no video frames")
        _VIDEO_INFO[key] = (frames, *size)
    return _VIDEO_INFO[key]


def read_video_at(path: str, indices: Sequence[int]) -> list[np.ndarray]:
    """Frames number `indices` (0-based, in decoding order) of a video file, (H, W, 3) uint8.

    Decodes from the start and keeps only the wanted frames, stopping after the last one: exact
    indices, where seeking by timestamp can land a frame off. Example: the frames [0, 11] of a
    12-frame 64 x 48 clip -> two (48, 64, 3) arrays.
    """
    info = _stat(path, "video")
    return list(_decode_video(path, tuple(int(i) for i in indices), info.st_mtime_ns))


# The last 8 decoded samples are kept: VSI-Bench asks many questions about one video, all with
# the same sampled frames, and decoding a long video is the slow part of loading a batch.
@functools.lru_cache(maxsize=8)
def _decode_video(path: str, indices: tuple[int, ...], mtime_ns: int) -> tuple[np.ndarray, ...]:
    av = _import_av(path)
    wanted, found, last, count = set(indices), {}, max(indices), 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame-parallel decoding where the codec allows it
            for count, frame in enumerate(container.decode(stream), 1):
                if count - 1 in wanted:
                    found[count - 1] = frame.to_ndarray(format="rgb24")
                if count - 1 >= last:
                    break
    except Exception as e:  # as in video_info: any decoder failure is an unreadable video
        raise RecordError(f"video {path} is not readable ({_one_line(e)})") from None
    missing = [i for i in indices if i not in found]
    if missing:
        raise RecordError(f"video {path}: frame {missing[0]} asked, but only {count} frames decode")
    frames = tuple(found[i] for i in indices)
    for frame in frames:
        frame.flags.writeable = False  # shared through the cache: nobody may change them
    return frames


def read_video_frames(path: str, k: int, mode: str = "uniform", stride: int = 1, start: int = 0) -> list[np.ndarray]:
    """Sample k frames (H, W, 3 uint8) of a video file or a folder of images.

    Video files are decoded with PyAV (`pip install av`, optional); the frame count comes from
    the header (`video_info`), then only the sampled frames are kept (`read_video_at`).
    """
    if os.path.isdir(path):
        files = list_frame_files(path)
        return [read_image(files[i]) for i in sample_frame_indices(len(files), k, mode, stride, start)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    total = video_info(path)[0]
    return read_video_at(path, sample_frame_indices(total, k, mode, stride, start))


# Decoded frames and geometry arrays, least recently used first, up to FILE_CACHE_BYTES in all
# (per process). A training run reads each file of its records again every epoch (the toy's SFT
# warm-up reads each of its ~1,800 frames ~30 times), and decoding the PNGs is a third of building a
# batch (docs/EXPERIMENTS.md item 39). 1 GiB holds the toy's frames and ~1,700 ScanNet frames at
# 448 x 448; a file larger than the budget is read each time. Cached arrays are read-only: every
# caller that gets one shares it. Keyed by (kind, path, mtime, size), so a changed file is read again.
FILE_CACHE_BYTES = 1 << 30
_FILE_CACHE: collections.OrderedDict[tuple, tuple[np.ndarray, ...]] = collections.OrderedDict()
_file_cache_bytes = 0


def cached_arrays(path: str, kind: str, read: Callable[[str], Sequence[np.ndarray]]) -> tuple[np.ndarray, ...]:
    """`read(path)`'s arrays, from the cache when this version of the file was read before."""
    global _file_cache_bytes
    info = _stat(path, kind)
    key = (kind, path, info.st_mtime_ns, info.st_size)
    if key in _FILE_CACHE:
        _FILE_CACHE.move_to_end(key)
        return _FILE_CACHE[key]
    arrays = tuple(read(path))
    for array in arrays:
        array.flags.writeable = False
    size = sum(array.nbytes for array in arrays)
    if size <= FILE_CACHE_BYTES:
        _FILE_CACHE[key] = arrays
        _file_cache_bytes += size
        while _file_cache_bytes > FILE_CACHE_BYTES:
            _, dropped = _FILE_CACHE.popitem(last=False)
            _file_cache_bytes -= sum(array.nbytes for array in dropped)
    return arrays


def _decode_image(path: str) -> tuple[np.ndarray]:
    from PIL import Image

    with Image.open(path) as image:
        return (np.asarray(image.convert("RGB")),)


def read_image(path: str) -> np.ndarray:
    """One frame as an (H, W, 3) uint8 array, read-only (Pillow reads PNG and JPEG); cached."""
    return cached_arrays(path, "image", _decode_image)[0]


# =====================================================================================
# The record check: one structural and value check shared by every script
# =====================================================================================
# Every record a script reads passes `check_record` (cheap: no file is opened) and, through
# `load_records_checked`, `check_record_files` (images, videos, geometry). A problem is one line
# naming the file and line ("file:7", or "file[6]" in a JSON array) and what is wrong, never a
# traceback from deep inside: a malformed box found at load time costs a second, the same box
# found inside a reward at step 3,000 costs the run.


class RecordError(ValueError):
    """A malformed data record; the message names the file and line (or file[index])."""


class MissingDependency(RecordError):
    """An optional package (PyAV for video files, pyarrow for parquet) is needed and absent.

    A RecordError, so that every script's `except RecordError` prints its one line; `skip_bad`
    never skips it: it is not the record's fault, and would skip every record of the file.
    """


REQUIRED_KEYS = {
    "detection": ("images", "conversations", "boxes"),
    "grounding": ("images", "conversations", "gt_bbox", "gt_frame", "cam2global", "axis_align_matrix"),
    "spatial": ("images", "conversations", "question_type", "answer"),
}
BOX_FIELDS = "[x, y, z, dx, dy, dz, yaw, roll, pitch]"


def _kind(value: Any) -> str:
    """How a wrong value reads in a message: "null", "a string", "dict", ..."""
    if value is None:
        return "null"
    return "a string" if isinstance(value, str) else type(value).__name__


def _is_number(value: Any) -> bool:
    """A JSON number (True and False are ints to Python, not numbers to a box)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_box(value: Any, what: str, where: str) -> None:
    """A 9-number box: finite numbers, positive sizes; else RecordError naming `where` and `what`.

    >>> check_box([1, 0, 2, .5, .8, .5, 0, 0, 0], "gt_bbox", "f.jsonl:3")           # fine
    >>> check_box([1, 0, 2, .5, .8, .5, 0, 0], "gt_bbox", "f.jsonl:3")
    Traceback (most recent call last):
    RecordError: f.jsonl:3: gt_bbox has 8 numbers, need 9 [x, y, z, dx, dy, dz, yaw, roll, pitch]
    """
    if not isinstance(value, (list, tuple)):
        raise RecordError(f"{where}: {what} must be a list of 9 numbers {BOX_FIELDS}, got {_kind(value)}")
    # The usual case in one pass (ScanNet train holds ~1.7 M boxes); the loops below name a fault.
    if (len(value) == 9 and all(type(v) is float or type(v) is int for v in value)
            and all(map(math.isfinite, value)) and min(value[3:6]) > 0):
        return
    if len(value) != 9:
        raise RecordError(f"{where}: {what} has {len(value)} numbers, need 9 {BOX_FIELDS}")
    for i, v in enumerate(value):
        if not _is_number(v):
            raise RecordError(f"{where}: {what}[{i}] is {v!r}, not a number")
        if not math.isfinite(v):
            raise RecordError(f"{where}: {what}[{i}] is {v} (not finite)")
    # A box of size <= 0 has no volume: its IoU with anything is 0/0.
    for i in range(3, 6):
        if value[i] <= 0:
            raise RecordError(f"{where}: {what}[{i}] (a size) is {value[i]}; sizes must be > 0")


def check_boxes(boxes: Any, where: str) -> None:
    """Detection ground truth: a list (maybe empty) of {"label": str, "bbox_3d": 9 numbers}.

    An integer label is an error, not category "7": labels are matched as strings.
    """
    if not isinstance(boxes, list):
        raise RecordError(f"{where}: 'boxes' must be a list of {{label, bbox_3d}}, got {_kind(boxes)}")
    for i, box in enumerate(boxes):
        if not isinstance(box, dict):
            raise RecordError(f"{where}: boxes[{i}] must be an object {{label, bbox_3d}}, got {_kind(box)}")
        label = box.get("label")
        if not isinstance(label, str) or not label:
            raise RecordError(f"{where}: boxes[{i}].label is {label!r} ({_kind(label)}); "
                              "it must be a category name (a non-empty string)")
        check_box(box.get("bbox_3d"), f"boxes[{i}].bbox_3d", where)


def check_matrix(value: Any, what: str, where: str) -> None:
    """A 4x4 matrix of finite numbers (a pose or the axis alignment)."""
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RecordError(f"{where}: {what} must be a 4x4 matrix of numbers") from None
    if matrix.shape != (4, 4):
        raise RecordError(f"{where}: {what} must be a 4x4 matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise RecordError(f"{where}: {what} holds non-finite values")


def record_num_frames(record: dict) -> int:
    """How many frames a record shows: its images, or the sampled frames of its video."""
    if record.get("video") is not None:
        return len(record["frame_indices"])
    return len(record["images"])


def _check_frames(record: dict, where: str) -> int:
    """`images` (a non-empty list of paths) or `video` + `frame_indices`; returns the frame count."""
    if record.get("video") is not None:
        indices = record.get("frame_indices")
        if not isinstance(record["video"], str):
            raise RecordError(f"{where}: 'video' must be a path, got {_kind(record['video'])}")
        if (not isinstance(indices, list) or not indices
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
            raise RecordError(f"{where}: a video record needs 'frame_indices', a non-empty list of frame numbers")
        return len(indices)
    images = record["images"]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise RecordError(f"{where}: 'images' must be a non-empty list of paths")
    return len(images)


def _check_conversations(record: dict, where: str, num_frames: int) -> None:
    """A human and a gpt turn with string values; one <image> in the human turn per frame."""
    turns = record["conversations"]
    if (not isinstance(turns, list) or len(turns) < 2
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2])):
        raise RecordError(f"{where}: 'conversations' must hold a human and a gpt turn with string 'value'")
    n_placeholders = turns[0]["value"].count(IMAGE_PLACEHOLDER)
    if n_placeholders != num_frames:
        raise RecordError(f"{where}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for {num_frames} images")


def _check_grounding(record: dict, where: str, num_frames: int) -> None:
    """gt_bbox a box; gt_frame a sampled frame or null (ScanRefer val has none); one pose per frame."""
    check_box(record["gt_bbox"], "gt_bbox", where)
    frame = record["gt_frame"]
    if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool)
                              or not 0 <= frame < num_frames):
        raise RecordError(f"{where}: gt_frame is {frame!r}; it must be a frame index 0..{num_frames - 1} or null")
    poses = record["cam2global"]
    if not isinstance(poses, list) or len(poses) != num_frames:
        raise RecordError(f"{where}: 'cam2global' needs one 4x4 pose per image ({num_frames})")
    for i, pose in enumerate(poses):
        check_matrix(pose, f"cam2global[{i}]", where)
    check_matrix(record["axis_align_matrix"], "axis_align_matrix", where)


def _check_spatial(record: dict, where: str, num_frames: int) -> None:
    """question_type and answer strings; options null or a list of strings ("A. sofa")."""
    if not isinstance(record["question_type"], str):
        raise RecordError(f"{where}: question_type must be a string, got {_kind(record['question_type'])}")
    if not isinstance(record["answer"], str):
        raise RecordError(f"{where}: answer must be a string, got {_kind(record['answer'])}")
    options = record.get("options")
    if options is not None and (not isinstance(options, list) or not all(isinstance(o, str) for o in options)):
        raise RecordError(f"{where}: options must be null or a list of strings, got {_kind(options)}")


TASK_CHECKS: dict[str, Callable[[dict, str, int], None]] = {
    "detection": lambda record, where, n: check_boxes(record["boxes"], where),
    "grounding": _check_grounding,
    "spatial": _check_spatial,
}


def check_record(record: Any, where: str) -> dict:
    """Validate one record's structure and ground truth; RecordError naming `where` (file:line).

    No file is opened here (`check_record_files` does that), so it costs microseconds.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {_kind(record)}")
    task = record.get("task")
    if task not in TASKS:
        raise RecordError(f"{where}: 'task' must be one of {TASKS}, got {task!r}")
    # A video record names its frames by `video` + `frame_indices` instead of `images`.
    video = record.get("video") is not None
    missing = [key for key in REQUIRED_KEYS[task] if key not in record and not (key == "images" and video)]
    if missing:
        raise RecordError(f"{where}: {task} record lacks key(s) {missing}")
    num_frames = _check_frames(record, where)
    _check_conversations(record, where, num_frames)
    TASK_CHECKS[task](record, where, num_frames)
    _check_geometry_keys(record, where, num_frames)
    return record


def check_intrinsics(value: Any, what: str, where: str) -> None:
    """A pinhole intrinsics matrix: 3x3 or 4x4 (VG LLM's cam2img) finite numbers, fx and fy > 0."""
    try:
        matrix = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise RecordError(f"{where}: {what} must be a 3x3 or 4x4 intrinsics matrix of numbers") from None
    if matrix.shape not in ((3, 3), (4, 4)):
        raise RecordError(f"{where}: {what} must be a 3x3 or 4x4 intrinsics matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise RecordError(f"{where}: {what} holds non-finite values")
    if not (matrix[0, 0] > 0 and matrix[1, 1] > 0):
        raise RecordError(f"{where}: {what} has focal lengths fx={matrix[0, 0]}, fy={matrix[1, 1]}; both must be > 0")


def _check_paths(value: Any, key: str, where: str, num_frames: int) -> None:
    """A list of non-empty path strings, one per frame."""
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise RecordError(f"{where}: '{key}' must be a list of paths, one per frame, got {_kind(value)}")
    if len(value) != num_frames:
        raise RecordError(f"{where}: '{key}' lists {len(value)} files for {num_frames} images")


def _check_geometry_keys(record: dict, where: str, num_frames: int) -> None:
    """The geometry prior's keys (this file's section "Geometry priors"), all optional.

    geometry: a features file for the record, or a list of per-frame files; geometry_source:
    which grid the features are on (GEOMETRY_SOURCES; default: told by the grid); depths: one
    depth map per frame, which then needs cam2img (+ optional depth_cam2img) and one cam2global
    pose per frame.
    """
    geometry = record.get("geometry")
    if geometry is not None and not isinstance(geometry, str):
        if not isinstance(geometry, list):
            raise RecordError(f"{where}: 'geometry' must be a path (or a list of per-frame paths), "
                              f"got {_kind(geometry)}")
        _check_paths(geometry, "geometry", where, num_frames)
    source = record.get("geometry_source")
    if source is not None and source not in GEOMETRY_SOURCES:
        raise RecordError(f"{where}: geometry_source is {source!r}; it must be one of {GEOMETRY_SOURCES}")
    if record.get("depths") is None:
        return
    _check_paths(record["depths"], "depths", where, num_frames)
    missing = [key for key in ("cam2img", "cam2global") if record.get(key) is None]
    if missing:
        raise RecordError(f"{where}: 'depths' needs {missing} (intrinsics and one camera pose per frame) "
                          "to back-project the depth maps")
    check_intrinsics(record["cam2img"], "cam2img", where)
    if record.get("depth_cam2img") is not None:
        check_intrinsics(record["depth_cam2img"], "depth_cam2img", where)
    poses = record["cam2global"]
    if not isinstance(poses, list) or len(poses) != num_frames:
        raise RecordError(f"{where}: 'cam2global' needs one 4x4 pose per image ({num_frames})")
    for i, pose in enumerate(poses):
        check_matrix(pose, f"cam2global[{i}]", where)


# =====================================================================================
# Published formats -> the project's records
# =====================================================================================
# The field names are those of the upstream files (docs/DESIGN.md, "Records and prompts"):
#   VG LLM detection (scannet_det_{train,val}_4frames.json, an indented JSON array): images
#     (relative to the media root, e.g. "scannet/posed_images/scene0415_00/00810.jpg"),
#     conversations, boxes [{label, bbox_3d}] in the first camera; val adds cam2img, cam2global,
#     axis_align_matrix.
#   VG LLM ScanRefer (scanrefer_{train,val}_32frames.json): images, conversations, prompt,
#     gt_bbox (axis-aligned scene frame), target ({frame, bbox_3d} in train, null in val),
#     metadata {dataset, question_type, ann_id, object_id}; val adds the camera matrices.
#   VSI-Bench rows: id, dataset, scene_name, question_type, question, options, ground_truth;
#     the video is <media_root>/<dataset>/<scene_name>.mp4.
# Other keys pass through untouched. The answer a published record teaches is rebuilt from its
# ground truth in the project's answer format (compact JSON, 2 decimals) and the published text
# kept as `source_answer`; the human turn is kept as VG LLM's own loader reads it.

VSI_KEYS = ("dataset", "scene_name", "question_type", "question", "ground_truth")
# VSI-Bench's evaluation shows 32 frames to its open models of this kind (thinking-in-space's
# evaluate_all_in_one.sh: num_frames=32; VG LLM's scripts/evaluation/eval.sh: max_num_frames=32).
VSI_NUM_FRAMES = 32
KIND_TASK = {"vsibench": "spatial", "scanrefer": "grounding", "vgllm_detection": "detection"}


def record_kind(row: dict) -> str:
    """Which format a row is in: "vsibench", "scanrefer", "vgllm_detection" or "project".

    Recognised by keys: VSI-Bench rows by theirs; a row with "task" is the project's own; else
    `gt_bbox` without `gt_frame` means a VG LLM ScanRefer record and `boxes` a VG LLM detection
    record.

    >>> record_kind({"dataset": "scannet", "scene_name": "scene0011_00", "question": "How many chairs?",
    ...              "question_type": "object_counting", "ground_truth": "2", "options": None})
    'vsibench'
    """
    if all(key in row for key in VSI_KEYS):
        return "vsibench"
    if "task" in row:
        return "project"
    if "gt_bbox" in row and "gt_frame" not in row:
        return "scanrefer"  # VG LLM keeps ScanRefer's frame in `target`; the project in `gt_frame`
    return "vgllm_detection" if "boxes" in row else "project"


def _human_turn(record: dict) -> str | None:
    """The human turn's text of a row, or None if the row has none (check_record reports it)."""
    turns = record.get("conversations")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and isinstance(turns[0].get("value"), str):
        return turns[0]["value"]
    return None


def _published_turns(record: dict, answer: str) -> Any:
    """A published record's conversations: the human turn as VG LLM's loader reads it, our answer.

    VG LLM's training loader (src/qwen_vl/data/data_qwen.py) replaces "<image>\\n" by "<image>",
    so its checkpoints saw the frames directly followed by the text; the same is done here.
    """
    human = _human_turn(record)
    if human is None:
        return record.get("conversations")  # malformed: left for check_record to name
    turns = record["conversations"]
    if len(turns) > 1 and isinstance(turns[1], dict) and "value" in turns[1]:
        record["source_answer"] = turns[1]["value"]
    human = human.replace(IMAGE_PLACEHOLDER + "\n", IMAGE_PLACEHOLDER)
    return [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]


def _from_vgllm_detection(record: dict, where: str) -> dict:
    """VG LLM detection row -> detection record (answer rebuilt from `boxes`)."""
    check_boxes(record["boxes"], where)  # the answer is built from them: check them first
    record["conversations"] = _published_turns(record, detection_answer(record["boxes"]))
    return record


def _description(text: str | None) -> str | None:
    """The referring expression in a ScanRefer prompt ("...Text: {desc}\\nOutput a JSON ...")."""
    match = re.search(r"Text: (.*?)\s*Output a JSON", text or "", re.S)
    return match.group(1) if match else None


def _from_scanrefer(record: dict, where: str) -> dict:
    """VG LLM ScanRefer row -> grounding record; no `target` (val) -> gt_frame None, answer "".

    A frame-less record still scores its box (the IoU needs only the predicted frame's pose);
    its frame accuracy is not applicable.
    """
    target = record.get("target")
    if target is None:
        gt_frame, answer = None, ""
    elif isinstance(target, dict) and "frame" in target and "bbox_3d" in target:
        gt_frame = target["frame"]
        if not isinstance(gt_frame, int) or isinstance(gt_frame, bool):
            raise RecordError(f"{where}: target.frame is {gt_frame!r}, not a frame index")
        check_box(target["bbox_3d"], "target.bbox_3d", where)
        answer = grounding_answer(gt_frame, target["bbox_3d"])
    else:
        raise RecordError(f"{where}: 'target' must be null or {{\"frame\", \"bbox_3d\"}}, got {_kind(target)}")
    record["gt_frame"] = gt_frame
    missing = [key for key in ("cam2global", "axis_align_matrix") if key not in record]
    if missing:
        # The IoU maps the predicted box to the scene through them. VG LLM's preprocessing
        # writes them for val, and for train only with --include_cam_params.
        raise RecordError(f"{where}: ScanRefer record lacks {missing} (needed to score the box; "
                          "VG LLM writes them for val, for train with --include_cam_params)")
    prompt, images = record.get("prompt"), record.get("images")
    if "conversations" not in record and isinstance(prompt, str) and isinstance(images, list):
        # VG LLM's evaluation builds the human turn from `prompt` with "Frame-i: " before each frame.
        frames = "".join(f"Frame-{i}: {IMAGE_PLACEHOLDER}" for i in range(len(images)))
        record["conversations"] = [{"from": "human", "value": frames + "\n" + prompt},
                                   {"from": "gpt", "value": ""}]
    record["conversations"] = _published_turns(record, answer)
    record.setdefault("description", _description(prompt if isinstance(prompt, str) else _human_turn(record)))
    return record


def _vsi_options(record: dict, where: str) -> list[str] | None:
    """A VSI-Bench row's options: a list of strings for MC types, None for numeric ones."""
    qtype, options = record["question_type"], record.get("options")
    if qtype in NUMERIC_QUESTION_TYPES:
        return None  # VSI-Bench's numeric rows have options null; its prompt ignores them
    if qtype not in MC_QUESTION_TYPES:
        raise RecordError(f"{where}: unknown VSI-Bench question_type {qtype!r}")
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise RecordError(f"{where}: {qtype} is multiple choice; 'options' must be a list of strings, got {_kind(options)}")
    return options


def _from_vsibench(record: dict, where: str, root: str, num_frames: int | None) -> dict:
    """VSI-Bench row -> spatial video record: k frames by linspace, the VSI-Bench prompt.

    The video is `<root>/<dataset>/<scene_name>.mp4`; its header gives the frame count
    (`video_info`). A video shorter than k frames shows all of them (as VG LLM's evaluation does).
    Example: a 12-frame video, num_frames=8 -> frame_indices [0, 2, 3, 5, 6, 8, 9, 11].
    """
    for key in ("dataset", "scene_name", "question"):
        if not isinstance(record[key], str):
            raise RecordError(f"{where}: {key} must be a string, got {_kind(record[key])}")
    truth = record["ground_truth"]
    if not isinstance(truth, str) and not _is_number(truth):
        raise RecordError(f"{where}: ground_truth must be a string or a number, got {_kind(truth)}")
    options = _vsi_options(record, where)
    video = os.path.join(root, record["dataset"], record["scene_name"] + ".mp4")
    total = _at(where, video_info, video)[0]
    k = VSI_NUM_FRAMES if num_frames is None else num_frames
    indices = sample_frame_indices(total, min(k, total))
    prompt = spatial_prompt(len(indices), record["question"], options)
    record.update(video=video, frame_indices=indices, answer=str(truth), options=options or [],
                  conversations=[{"from": "human", "value": prompt}, {"from": "gpt", "value": str(truth)}])
    return record


def normalise(row: Any, where: str, root: str, task: str | None = None, num_frames: int | None = None,
              default_id: str | None = None) -> dict:
    """Any supported row -> a record in the project's format (not yet checked: see check_record).

    `task` is the task the file is read as (argument or file name), `root` the folder relative
    paths start from. Example: a VG LLM detection row {"images": [...4], "conversations": [...],
    "boxes": [...]} -> the same with task "detection", the project's answer text, `source_answer`.
    """
    if not isinstance(row, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {_kind(row)}")
    kind = record_kind(row)
    record = dict(row)  # a copy: the caller's row stays as read
    own = record.get("task") if kind == "project" else KIND_TASK[kind]
    if own in TASKS and task is not None and own != task:
        raise RecordError(f"{where}: a {own} record in a file read as {task}")
    record["task"] = own if own is not None else task  # VG LLM's own rows carry no "task" key
    if kind == "vgllm_detection":
        record = _from_vgllm_detection(record, where)
    elif kind == "scanrefer":
        record = _from_scanrefer(record, where)
    elif kind == "vsibench":
        record = _from_vsibench(record, where, root, num_frames)
    if default_id is not None:
        record.setdefault("id", default_id)
    if "id" in record:
        record["id"] = str(record["id"])  # VSI-Bench ids are integers; the project's are strings
    return record


# =====================================================================================
# Reading record files: <split>/<task>.jsonl, JSON lines, a JSON array, parquet
# =====================================================================================


def _record_file(path: str, task: str | None) -> str:
    """The file to read: `path` itself, or `<path>/<task>.jsonl` for a split folder."""
    if os.path.isdir(path):
        if task is None:
            raise ValueError(f"{path} is a folder: name the task ({', '.join(TASKS)})")
        path = os.path.join(path, f"{task}.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"records not found: {path} (generate the toy data with: python scenes.py)")
    return path


def _first_char(path: str) -> str:
    """The first non-blank character of a text file ("[" for a JSON array), "" if none."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return line.strip()[0]
    except UnicodeDecodeError:
        raise RecordError(f"{path}: not a text file of JSON records (nor a .parquet)") from None
    return ""


def _parquet_rows(path: str) -> list[dict]:
    """The rows of a parquet file (VSI-Bench's test-00000-of-00001.parquet) with pyarrow, if installed."""
    try:
        import pyarrow.parquet as pq  # not a dependency of this project: only parquet needs it
    except ImportError:
        raise MissingDependency(
            f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it once where "
            "pandas and pyarrow are installed: python -c \"import pandas as pd; "
            f"pd.read_parquet('{path}').to_json('{os.path.splitext(path)[0]}.jsonl', orient='records', lines=True)\""
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError, ...) all mean "unreadable"
        raise RecordError(f"{path}: not a readable parquet file ({_one_line(e)})") from None


def iter_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(where, row) for every record of a file; a row that is not JSON comes as a RecordError.

    `where` is "file:line" for JSON lines and "file[index]" for a JSON array or parquet, which is
    how every message names a record. Example: an indented JSON array of two records ->
    ("f.json[0]", {...}), ("f.json[1]", {...}).
    """
    if path.endswith(".parquet"):
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(_parquet_rows(path)))
        return
    if _first_char(path) == "[":
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield from ((f"{path}[{i}]", row) for i, row in enumerate(rows))
        return
    # errors="replace": a line with bad bytes fails as JSON (one line), not as a UnicodeDecodeError.
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                # One broken line is one bad record (skippable), not a broken file.
                yield where, RecordError(f"{where}: not valid JSON ({e.msg})")


def resolve(record: dict, relative: str) -> str:
    """A path of a record, relative to its root (absolute paths stay as they are).

    The root is the media root when one is given, else the record file's folder.
    """
    return relative if os.path.isabs(relative) else os.path.join(record.get("_root", "."), relative)


def _absolute_paths(record: dict) -> None:
    """Make the record's image, video, geometry and depth paths absolute (they start at `_root`)."""
    for key in ("images", "geometry", "depths"):
        if isinstance(record.get(key), list):
            record[key] = [resolve(record, p) for p in record[key]]
    for key in ("video", "geometry"):
        if isinstance(record.get(key), str) and record[key]:
            record[key] = resolve(record, record[key])


def read_record(row: Any, where: str, root: str, task: str | None = None, num_frames: int | None = None,
                default_id: str | None = None, check_files: bool = True, min_side: int | None = None) -> dict:
    """One row -> one checked record (normalise, check_record, absolute paths, file checks)."""
    if isinstance(row, RecordError):
        raise row  # a line that was not JSON
    record = check_record(normalise(row, where, root, task, num_frames, default_id), where)
    record["_root"], record["_where"] = root, where  # where later checks (check_lengths) name it
    _absolute_paths(record)
    if check_files:
        check_record_files(record, where, MIN_IMAGE_SIDE if min_side is None else min_side)
    return record


def load_records_checked(path: str, task: str | None = None, limit: int | None = None, *,
                         media_root: str | None = None, num_frames: int | None = None,
                         skip_bad: bool = False, check_files: bool = True,
                         min_side: int | None = None) -> tuple[list[dict], list[str]]:
    """Read, normalise and check the records of one file: (records, skipped messages).

    `path`: a split folder with `task` (reads `<folder>/<task>.jsonl`), a .jsonl file, a .json
    array, or a .parquet file (needs pyarrow); VG LLM and VSI-Bench rows are recognised by their
    keys. `media_root`: where relative image / video / geometry paths start (default: the file's
    folder). `num_frames`: frames sampled from each video (VSI-Bench rows; default 32).
    `check_files`: open every image header, video header and geometry file (cached by path).
    With `skip_bad`, a bad record is left out and its one-line message returned; otherwise the
    first one raises (RecordError, or FileNotFoundError for a missing file). `limit` counts the
    records kept. Example, in a script:

        records, skipped = load_records_checked("data/val", "detection", skip_bad=True)
        if skipped: print(f"skipped {len(skipped)} bad records, the first: {skipped[0]}")
    """
    file = _record_file(path, task)
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if media_root is not None and not os.path.isdir(media_root):
        raise FileNotFoundError(f"media root not found: {media_root}")
    stem = os.path.splitext(os.path.basename(file))[0]
    task = task if task is not None else (stem if stem in TASKS else None)
    root = os.path.abspath(media_root if media_root is not None else os.path.dirname(os.path.abspath(file)))
    def read(numbered: tuple[int, tuple[str, Any]]) -> dict:
        index, (where, row) = numbered
        return read_record(row, where, root, task, num_frames, f"{stem}-{index}", check_files, min_side)

    records, skipped = [], []
    for record in good_ones(enumerate(iter_rows(file)), read, skip_bad, skipped):
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        first = f" ({len(skipped)} bad; the first: {skipped[0]})" if skipped else ""
        raise RecordError(f"{file}: no records{first}")
    return records, skipped


class RecordList(list):
    """A list of records that also says which were skipped (`.skipped`, one message each)."""

    skipped: list[str] = []


def load_records(path: str, task: str | None = None, limit: int | None = None,
                 media_root: str | None = None, skip_bad: bool = False, num_frames: int | None = None,
                 check_files: bool = False, min_side: int | None = None) -> RecordList:
    """`load_records_checked` as a list (the skipped messages in `.skipped`); paths become absolute.

    Files are not opened by default (`check_files=False`): the structure and ground truth of
    every record are still checked. Scripts call `load_records_checked`, which opens them.
    Each record gains `_root` (where its relative paths started) and `_where` ("file:line").
    """
    records, skipped = load_records_checked(path, task, limit, media_root=media_root, num_frames=num_frames,
                                            skip_bad=skip_bad, check_files=check_files, min_side=min_side)
    out = RecordList(records)
    out.skipped = skipped
    return out


# =====================================================================================
# File checks: images, videos and geometry, opened once per path
# =====================================================================================
# Only headers are read (an image's size, a video's frame count), plus PIL's integrity check
# and a finiteness pass over each geometry file through a memory map, so checking thousands of
# records costs seconds. Results, bad ones included, are cached by (path, mtime, size): ScanNet
# frames and VSI-Bench videos are shared by many records.

# The smallest side Qwen2.5-VL's own preprocessing accepts: patch 14 x merge 2 (qwen_vl_utils'
# smart_resize refuses a side below this factor; fit_image_size, like transformers', would
# silently blow a 3 x 3 image up to 28 x 28, a frame of nothing).
MIN_IMAGE_SIDE = 28
MAX_ASPECT_RATIO = 200  # smart_resize's other limit: a longer side over 200x the shorter one

# (kind, path, mtime, size) -> a file's checked header, or the one-line reason it is bad: every
# image, depth map and geometry file a record names is opened once per process (thousands of
# records share frames), and again only when the file has changed.
_HEADERS: dict[tuple, Any] = {}


def _checked_header(path: str, kind: str, read: Callable[[str], Any]) -> Any:
    """`read(path)` once per file version; its str result (what is wrong) raises RecordError."""
    info = _stat(path, kind)
    key = (kind, path, info.st_mtime_ns, info.st_size)
    if key not in _HEADERS:
        _HEADERS[key] = read(path)
    if isinstance(_HEADERS[key], str):
        raise RecordError(_HEADERS[key])
    return _HEADERS[key]


def _read_image_header(path: str) -> tuple[int, int] | str:
    """(height, width) of an image after PIL's integrity check, or what is wrong with it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            # verify() walks a PNG's chunks checking their CRCs without decompressing pixels.
            image.verify()
    except Exception as e:  # PIL raises many classes (UnidentifiedImageError, SyntaxError, OSError, ...)
        return f"image {path} is not a readable image ({_one_line(e)})"
    return height, width


def image_hw(path: str) -> tuple[int, int]:
    """(height, width) of an image file, checked and read from its header; cached.

    Example: a 112 x 112 PNG -> (112, 112); a text file named .png -> RecordError.
    """
    return _checked_header(path, "image", _read_image_header)


def _finite(arrays) -> bool:
    """Whether every array of an iterable holds only finite values (one at a time in memory)."""
    return all(np.isfinite(a).all() for a in arrays)


def _read_npy_header(path: str) -> tuple[str, tuple] | str:
    """("array", shape) of a finite numeric .npy, or what is wrong with it."""
    try:
        prior = np.load(path, mmap_mode="r")  # a memory map: only the header is read here
    except Exception as e:  # not an .npy, pickled objects, truncated: all unreadable
        return f"geometry {path} is not a readable .npy ({_one_line(e)})"
    if prior.dtype.kind not in "fiu":  # real numbers (not bool, complex, strings or objects)
        return f"geometry {path} has dtype {prior.dtype}, not numbers"
    # One frame at a time, so a large prior never sits in memory whole.
    if not _finite(prior if prior.ndim == 4 else [prior]):
        return f"geometry {path} holds non-finite values (NaN or Inf)"
    return "array", tuple(prior.shape)


def _frame_keys(keys: Sequence[str]) -> list[str] | None:
    """The tensor names of a per-frame safetensors file in frame order ("0", "1", ... or "000", ...),
    or None if the names are not exactly the frame numbers 0..F-1."""
    if not keys or not all(k.isdigit() for k in keys):
        return None
    ordered = sorted(keys, key=int)
    return ordered if [int(k) for k in ordered] == list(range(len(keys))) else None


def _read_safetensors_header(path: str) -> tuple[str, tuple] | str:
    """("array", shape) for one tensor, ("frames", (shape, ...)) for one tensor per frame (keys
    "0", "1", ...), with every value checked finite; or what is wrong with the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            frame_keys = _frame_keys(keys)
            if len(keys) != 1 and frame_keys is None:
                return (f"geometry {path} holds tensors {sorted(keys)[:4]}{'...' if len(keys) > 4 else ''}: "
                        f"give one tensor (frames, Hp, Wp, C) or one (Hp, Wp, C) tensor per frame named 0, 1, ...")
            order = keys if frame_keys is None else frame_keys
            shapes = []
            for key in order:
                tensor = f.get_slice(key)
                shape, dtype = tuple(tensor.get_shape()), tensor.get_dtype()
                if dtype == "BOOL" or dtype.startswith("C"):  # booleans, complex numbers
                    return f"geometry {path}: tensor {key!r} has dtype {dtype}, not numbers"
                # Frame by frame (a slice reads only its bytes), so a large prior never sits in memory whole.
                frames = (tensor[i] for i in range(shape[0])) if len(shape) == 4 else [tensor[:]]
                if not all(torch.isfinite(t.float()).all() for t in frames):
                    return f"geometry {path}: tensor {key!r} holds non-finite values (NaN or Inf)"
                shapes.append(shape)
    except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
        return f"geometry {path} is not a readable .safetensors file ({_one_line(e)})"
    if frame_keys is None:
        return "array", shapes[0]
    return "frames", tuple(shapes)


def _read_geometry_header(path: str) -> tuple[str, tuple] | str:
    if path.endswith(".safetensors"):
        return _read_safetensors_header(path)
    return _read_npy_header(path)


def geometry_header(path: str) -> tuple[str, tuple]:
    """What a checked geometry file holds: ("array", shape) or ("frames", shapes); cached by
    (path, mtime, size). RecordError (bad) or FileNotFoundError (missing), one line naming it."""
    return _checked_header(path, "geometry", _read_geometry_header)


def geometry_shape(path: str) -> tuple[int, ...]:
    """The checked shape (frames, Hp, Wp, C) of a record-level geometry file; cached. RecordError if bad."""
    kind, shapes = geometry_header(path)
    if kind == "frames":
        if len(set(shapes)) != 1 or len(shapes[0]) != 3:
            raise RecordError(f"geometry {path}: its per-frame tensors must all be (Hp, Wp, C) of one shape, "
                              f"got {list(shapes)}")
        return (len(shapes), *shapes[0])
    if len(shapes) != 4:
        raise RecordError(f"geometry {path} has shape {shapes}; it must be (frames, Hp, Wp, C)")
    return shapes


def _geometry_paths(record: dict) -> list[str]:
    """The record's geometry files: one for the record, or one per frame."""
    geometry = record["geometry"]
    return [resolve(record, p) for p in ([geometry] if isinstance(geometry, str) else geometry)]


def geometry_frame_shapes(record: dict) -> list[tuple[int, int, int]]:
    """(Hp, Wp, C) of the record's geometry features, one per frame, from checked file headers.

    A record-level file must hold one frame per image; each file of a per-frame list one frame,
    (Hp, Wp, C) or (1, Hp, Wp, C). All frames must have the same C. Raises RecordError.
    """
    num_frames = record_num_frames(record)
    shapes = []
    if isinstance(record["geometry"], str):
        path = _geometry_paths(record)[0]
        shape = geometry_shape(path)
        if shape[0] != num_frames:
            raise RecordError(f"geometry {path} has {shape[0]} frames for {num_frames} images")
        shapes = [tuple(shape[1:])] * num_frames
    else:
        for path in _geometry_paths(record):
            kind, held = geometry_header(path)
            if kind == "frames" and len(held) == 1:
                held = held[0]
            elif kind == "frames":
                raise RecordError(f"geometry {path} holds {len(held)} frames; a per-frame file holds one")
            if len(held) == 4 and held[0] == 1:
                held = held[1:]
            if len(held) != 3:
                raise RecordError(f"geometry {path} has shape {held}; a per-frame file must be (Hp, Wp, C)")
            shapes.append(tuple(held))
    if any(min(shape) < 1 for shape in shapes):
        raise RecordError(f"geometry {_geometry_paths(record)[0]}: empty feature grid {shapes[0]}")
    if len({shape[2] for shape in shapes}) > 1:
        raise RecordError(f"geometry of {num_frames} frames with different feature sizes "
                          f"{sorted({shape[2] for shape in shapes})}: every frame needs the same C")
    return shapes


def _read_depth_header(path: str) -> tuple[int, int] | str:
    """(height, width) of a depth map: a 16/32-bit integer PNG (millimetres) or a 2-D .npy (metres)."""
    if path.endswith(".npy"):
        try:
            depth = np.load(path, mmap_mode="r")
        except Exception as e:
            return f"depth {path} is not a readable .npy ({_one_line(e)})"
        if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
            return f"depth {path} has shape {tuple(depth.shape)} and dtype {depth.dtype}; it must be (H, W) numbers"
        return tuple(depth.shape)
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height, mode = *image.size, image.mode
            image.verify()
    except Exception as e:
        return f"depth {path} is not a readable image ({_one_line(e)})"
    if not mode.startswith("I"):
        return (f"depth {path} is a {mode} image; a depth PNG holds 16-bit millimetres "
                "(ScanNet's convention), a .npy float metres")
    return height, width


def depth_hw(path: str) -> tuple[int, int]:
    """(height, width) of a checked depth map; cached like images. RecordError if bad."""
    return _checked_header(path, "depth", _read_depth_header)


def _at(where: str, read: Callable, *args):
    """read(*args), with a file problem's one-line message prefixed by the record's place."""
    try:
        return read(*args)
    except MissingDependency:
        raise  # not about this record: the message stands as it is
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from None


def _check_side(height: int, width: int, what: str, where: str, min_side: int) -> None:
    """Each side >= min_side and the aspect ratio within Qwen2.5-VL's limit."""
    if min(height, width) < min_side:
        raise RecordError(f"{where}: {what} is {width} x {height} pixels; each side must be >= {min_side} "
                          "(Qwen2.5-VL's patch 14 x merge 2)")
    if max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise RecordError(f"{where}: {what} is {width} x {height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}")


def check_record_files(record: dict, where: str, min_side: int = MIN_IMAGE_SIDE) -> None:
    """Every file a (checked, absolute-path) record names exists and is usable; else one line.

    Images: a file, readable by PIL, each side >= min_side. A video: readable by PyAV, with the
    sampled frames inside it. Geometry: finite (Hp, Wp, C) features for every image (one file or
    one per frame, .npy or .safetensors); its grid is checked against the image patch grid once
    the image config is known (`check_lengths`). Depth maps: readable, 16-bit PNG or 2-D .npy.
    """
    num_frames = record_num_frames(record)
    if record.get("video") is not None:
        total, height, width = _at(where, video_info, record["video"])
        _check_side(height, width, f"video {record['video']}", where, min_side)
        if max(record["frame_indices"]) >= total:
            raise RecordError(f"{where}: frame {max(record['frame_indices'])} asked of a {total}-frame video")
    for path in record.get("images") or []:
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{where}: image not found: {path} "
                                    f"(relative paths start at {record.get('_root')}: set the media root)")
        height, width = _at(where, image_hw, path)
        _check_side(height, width, f"image {path}", where, min_side)
    if record.get("geometry"):
        _at(where, geometry_frame_shapes, record)
    for path in record.get("depths") or []:
        _at(where, depth_hw, resolve(record, path))


# =====================================================================================
# Sequence lengths: does a record fit the model's context?
# =====================================================================================


def visual_tokens(height: int, width: int, image_cfg) -> int:
    """LLM tokens of one frame: Qwen2.5-VL's resize, then one token per merge x merge patches.

    >>> visual_tokens(112, 112, model.ImageConfig())   # patch 14, merge 2: 8 x 8 patches
    16
    """
    p, m = image_cfg.patch_size, image_cfg.merge_size
    h, w = fit_image_size(height, width, p * m, image_cfg.min_pixels, image_cfg.max_pixels)
    return (h // p) * (w // p) // (m * m)


def frame_sizes(record: dict) -> list[tuple[int, int]]:
    """(height, width) of each frame of a record, from file headers (cached; nothing decoded)."""
    if record.get("video") is not None:
        _, height, width = video_info(resolve(record, record["video"]))
        return [(height, width)] * record_num_frames(record)
    return [image_hw(resolve(record, p)) for p in record["images"]]


def sequence_length(record: dict, tokenizer, image_cfg, completion_tokens: int | None = None) -> int:
    """Tokens of the record's batch row: prompt with its visual tokens, plus the answer.

    The answer is the SFT target (`target_text`), or `completion_tokens` new tokens (GRPO, eval).
    The image pads are special tokens, one token each that split the text around them, so the
    prompt is tokenised with none and the visual tokens added: the count equals `collate`'s.
    """
    tokens = [visual_tokens(h, w, image_cfg) for h, w in frame_sizes(record)]
    prompt = prompt_text(record["conversations"][0]["value"], [0] * len(tokens))
    length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + sum(tokens)
    if completion_tokens is None:
        return length + len(tokenizer(target_text(record), add_special_tokens=False)["input_ids"])
    return length + completion_tokens


def _check_geometry_grid(record: dict, image_cfg) -> None:
    """The record's prior, from file headers, against the model's need and each frame's patch grid.

    Features: C must be the model's (image_cfg.geometry_dim, when known) and each frame's grid
    one that `geometry_source` recognises (resampled at batch time). Depth maps: the model must
    take 3 or 4 features. A model that needs a prior refuses a record without one. Nothing is
    checked for a model without a prior (geometry_dim 0): the files are not read.
    """
    dim = _needed_dim(image_cfg)
    if dim == 0:
        return
    if record.get("geometry"):
        shapes = geometry_frame_shapes(record)
        _check_feature_size(shapes[0][2], dim, _geometry_paths(record)[0])
        for (h, w), (hf, wf, _) in zip(frame_sizes(record), shapes):
            geometry_source((hf, wf), (h, w), vit_grid(h, w, image_cfg), image_cfg.merge_size,
                            record.get("geometry_source"))
    elif record.get("depths") and dim:
        if dim not in DEPTH_FEATURES:
            raise RecordError(f"no 'geometry' features, and 3D points from its 'depths' give "
                              f"{' or '.join(map(str, DEPTH_FEATURES))} features per patch, but the model's "
                              f"geometry merger takes {dim}")
        for path in record["depths"]:
            depth_hw(resolve(record, path))
    elif dim:
        raise _missing_prior(dim)


def check_lengths(records: Sequence[dict], tokenizer, image_cfg, max_seq_len: int,
                  completion_tokens: int | None = None, skip_bad: bool = False) -> tuple[list[dict], list[str]]:
    """Records whose batch row fits `max_seq_len` tokens: (kept, messages of the others).

    Call it once the tokenizer is loaded; sizes come from file headers, so nothing is decoded.
    It also checks each record's geometry prior against the model's need and the image patch
    grid (`_check_geometry_grid`; both need image_cfg, whose geometry_dim model.load_model sets).
    Without `skip_bad` the first record that does not fit raises RecordError naming its file and
    line. Example: `records, dropped = check_lengths(records, tok, cfg, 4096, skip_bad=True)`.
    """
    def fits(record: dict) -> dict:
        where = record.get("_where", f"record {record.get('id')}")
        length = _at(where, sequence_length, record, tokenizer, image_cfg, completion_tokens)
        if length > max_seq_len:
            raise RecordError(f"{where}: {length} tokens (prompt, visual tokens, answer or budget) "
                              f"do not fit max_seq_len {max_seq_len}")
        _at(where, _check_geometry_grid, record, image_cfg)
        return record

    messages: list[str] = []
    kept = list(good_ones(records, fits, skip_bad, messages))
    return kept, messages


def good_ones(items, check: Callable[[Any], Any], skip_bad: bool, skipped: list[str]) -> Iterator[Any]:
    """`check(item)` for each item; a bad one (RecordError, FileNotFoundError) raises, or with
    `skip_bad` is left out and its one-line message appended to `skipped`. A missing optional
    dependency always raises: every record would fail the same way, not a record's fault.
    Example: list(good_ones([1, "x"], int_or_bad, True, msgs)) -> [1], msgs == ["x is bad"].
    """
    for item in items:
        try:
            result = check(item)
        except MissingDependency:
            raise
        except (RecordError, FileNotFoundError) as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        yield result


# =====================================================================================
# Images -> pixel_values, geometry -> per-token features (a hand-written Qwen2.5-VL processor)
# =====================================================================================


def fit_image_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2.5-VL's "smart resize": multiples of patch*merge, area within [min_pixels, max_pixels]."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


def images_to_patches(images: Sequence[np.ndarray], cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames -> (pixel_values, image_grid_thw) exactly as Qwen2.5-VL's image processor lays them out.

    Each frame is resized to a multiple of patch*merge, normalised with the CLIP mean/std, repeated
    `temporal_patch_size` times (a still image is a 2-frame clip to the ViT) and cut into patches
    ordered so that each merge x merge block of patches is contiguous (the merger concatenates them).
    Example: one 112 x 112 frame, patch 14, merge 2 -> pixel_values (64, 3*2*14*14), grid (1, 8, 8).
    """
    from PIL import Image

    p, t, m = cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    all_patches, grids = [], []
    for image in images:
        h, w = fit_image_size(image.shape[0], image.shape[1], p * m, cfg.min_pixels, cfg.max_pixels)
        if (h, w) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))
        x = (image.astype(np.float32).transpose(2, 0, 1) / 255.0 - mean) / std  # (3, h, w)
        x = np.repeat(x[None], t, axis=0)  # (t, 3, h, w)
        gh, gw = h // p, w // p
        x = x.reshape(1, t, 3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (1, gh/m, gw/m, m, m, 3, t, p, p)
        all_patches.append(x.reshape(gh * gw, 3 * t * p * p))
        grids.append((1, gh, gw))
    return torch.from_numpy(np.concatenate(all_patches)), torch.tensor(grids, dtype=torch.long)


def geometry_to_tokens(geometry: np.ndarray, grids: torch.Tensor, merge: int) -> torch.Tensor:
    """Per-patch prior (F, Hp, Wp, C) -> one row per visual token (F*Hp*Wp/merge^2, merge^2*C).

    The 2x2 neighbours of each token are concatenated in the same order as the ViT's patches, so
    row i of the result belongs to visual token i (VG LLM's treatment of VGGT features).
    """
    rows = []
    for frame, (_, gh, gw) in zip(geometry, grids.tolist()):
        if frame.shape[:2] != (gh, gw):
            raise ValueError(f"geometry grid {frame.shape[:2]} does not match the image patch grid {(gh, gw)}")
        c = frame.shape[2]
        x = frame.reshape(gh // merge, merge, gw // merge, merge, c).transpose(0, 2, 1, 3, 4)
        rows.append(x.reshape(-1, merge * merge * c))
    return torch.from_numpy(np.concatenate(rows).astype(np.float32))


# =====================================================================================
# Geometry priors: precomputed features on a known grid, resampled; 3D points from depth
# =====================================================================================
# The prior is fused per ViT patch, so each frame's features must end up on that frame's ViT
# patch grid (grid_h, grid_w), i.e. image_grid_thw after Qwen's resize at the model's pixel
# budget. A record brings them in one of two ways (docs/DESIGN.md, "Records and prompts"):
#
# * `geometry`: precomputed features, C per patch. One file for the record, or a list of
#   per-frame files. A .npy holds (frames, Hp, Wp, C) (a per-frame file (Hp, Wp, C) or
#   (1, Hp, Wp, C)); a .safetensors holds one tensor under any name, of those shapes, or one
#   (Hp, Wp, C) tensor per frame named by the frame number "0", "1", ... (zero-padding allowed).
#   Any numeric dtype (bf16 included); read as float32; every value must be finite.
# * `depths`: one depth map per frame (a 16-bit PNG in millimetres, ScanNet's convention, or a
#   2-D float .npy in metres; 0 or non-finite = no measurement) with the record's `cam2img`
#   intrinsics (`depth_cam2img` when the depth camera differs; otherwise cam2img scaled to the
#   depth map's size) and `cam2global` poses: `depth_points` makes the per-patch mean 3D point in
#   the first frame's camera (scenes.py's prior). Used when a record has no `geometry` and the
#   model's merger takes 3 features (x, y, z) or 4 (x, y, z, share of the patch with depth).
#
# The resampling rule. Each source grid covers a known part of the frame: its footprint, the
# frame's extent [a, a + b) in feature cells along each axis. A ViT patch centre at frame
# fraction t (= (i + 0.5) / grid_h) reads the feature grid at cell coordinate a + t * b, i.e.
# cell-centre index a + t * b - 0.5, bilinearly between the two nearest cells and clamped to the
# border cells: for a footprint covering the whole grid this is exactly
# F.interpolate(mode="bilinear", align_corners=False), what resizing the image does (tested),
# and the identity when the grids match. The grids recognised, in this order (`geometry_source`
# names one and skips the guess):
#
#   vit        the ViT patch grid itself: no resampling
#   vggt_crop  VGGT's load_and_preprocess_images(mode="crop"): width 518, height
#              round(H * 518 / W / 14) * 14, patch 14 -> (that / 14, 37); the whole frame (a
#              frame so tall that VGGT crops its height is not covered: refused)
#   vgllm      VG LLM's inputs: that crop-mode image cut at its top-left to multiples of
#              patch 14 x merge 2 (its Qwen input) -> (rows // 2 * 2, 36); the right and bottom
#              strips VGGT saw but the grid lacks read the border cells
#   vggt_pad   VGGT's mode="pad": the longer side 518, the other padded to 518 -> (37, 37),
#              the frame centred inside it (the padding is never read)
#   frame      any grid, taken to cover the whole frame (e.g. features made at another pixel
#              budget); only when a record names it
#
# Example: a 640 x 480 frame, VGGT crop mode -> 28 x 37 features; at Qwen2.5-VL's default budget
# the ViT grid is 34 x 46, so each of the 34 x 46 patches reads the 28 x 37 grid bilinearly.
# A grid that is none of these (e.g. features of the wrong frames or a wrong size) is refused,
# as are a wrong frame count and non-finite values.

GEOMETRY_SOURCES = ("vit", "vggt_crop", "vgllm", "vggt_pad", "frame")
VGGT_SIZE, VGGT_PATCH = 518, 14  # VGGT-1B's input width and patch size
DEPTH_PNG_SCALE = 1000.0  # depth PNG units per metre: millimetres (ScanNet, the synthetic world)
DEPTH_FEATURES = (3, 4)  # what depth_points makes: (x, y, z) or (x, y, z, valid share)


@dataclass(frozen=True)
class Footprint:
    """Where a feature grid sits on its frame: the frame spans cells [a, a + b) of each axis."""

    grid: tuple[int, int]  # (Hf, Wf) the source makes for this frame
    span_y: tuple[float, float]  # (a, b) along the rows
    span_x: tuple[float, float]  # (a, b) along the columns


def vit_grid(height: int, width: int, image_cfg) -> tuple[int, int]:
    """The ViT patch grid (grid_h, grid_w) of a frame after Qwen's resize (image_grid_thw[1:])."""
    p, m = image_cfg.patch_size, image_cfg.merge_size
    h, w = fit_image_size(height, width, p * m, image_cfg.min_pixels, image_cfg.max_pixels)
    return h // p, w // p


def _vggt_resize(height: int, width: int, pad: bool) -> tuple[int, int]:
    """(height, width) VGGT's load_and_preprocess_images resizes a frame to, before crop or pad."""
    if pad and height > width:
        return VGGT_SIZE, round(width * (VGGT_SIZE / height) / VGGT_PATCH) * VGGT_PATCH
    return round(height * (VGGT_SIZE / width) / VGGT_PATCH) * VGGT_PATCH, VGGT_SIZE


def source_footprint(source: str, frame_hw: tuple[int, int], grid: tuple[int, int], merge: int,
                     feature_hw: tuple[int, int] | None = None) -> Footprint | None:
    """The grid `source` (GEOMETRY_SOURCES) makes for a frame of frame_hw and where it lies, or
    None if that source cannot have made features covering this frame.

    `grid` is the frame's ViT grid; `feature_hw` is needed for "frame" (any grid). Example:
    source_footprint("vggt_crop", (480, 640), (34, 46), 2) -> grid (28, 37), spans (0, 28), (0, 37).
    """
    height, width = frame_hw
    cell = VGGT_PATCH
    if source == "vit":
        return Footprint(tuple(grid), (0.0, float(grid[0])), (0.0, float(grid[1])))
    if source == "frame":
        hf, wf = feature_hw
        return Footprint((hf, wf), (0.0, float(hf)), (0.0, float(wf)))
    if source in ("vggt_crop", "vgllm"):
        nh, nw = _vggt_resize(height, width, pad=False)
        if nh > VGGT_SIZE or nh < cell:  # VGGT centre-crops the height: the frame is not covered
            return None
        rows, cols = nh // cell, nw // cell
        if source == "vgllm":
            rows, cols = rows // merge * merge, cols // merge * merge
        return Footprint((rows, cols), (0.0, nh / cell), (0.0, nw / cell))
    if source == "vggt_pad":
        nh, nw = _vggt_resize(height, width, pad=True)
        n = VGGT_SIZE // cell
        return Footprint((n, n), (((VGGT_SIZE - nh) // 2) / cell, nh / cell),
                         (((VGGT_SIZE - nw) // 2) / cell, nw / cell))
    raise ValueError(f"unknown geometry source {source!r} (one of {GEOMETRY_SOURCES})")


def geometry_source(feature_hw: tuple[int, int], frame_hw: tuple[int, int], grid: tuple[int, int],
                    merge: int, declared: str | None = None) -> tuple[str, Footprint]:
    """Which source made features of grid feature_hw for this frame, and their footprint.

    `declared` (a record's geometry_source) is checked; otherwise the sources are tried in the
    order of GEOMETRY_SOURCES, "frame" excluded. RecordError naming both grids if none fits.
    Example: (28, 37) on a 480 x 640 frame -> ("vggt_crop", ...); (34, 46) -> ("vit", ...).
    """
    feature_hw, grid = tuple(feature_hw), tuple(grid)
    for source in [declared] if declared else GEOMETRY_SOURCES[:-1]:
        footprint = source_footprint(source, frame_hw, grid, merge, feature_hw)
        if footprint is not None and footprint.grid == feature_hw:
            return source, footprint
    height, width = frame_hw
    if declared:
        footprint = source_footprint(declared, frame_hw, grid, merge, feature_hw)
        made = "none (VGGT's crop mode cuts this frame's height)" if footprint is None else footprint.grid
        raise RecordError(f"geometry grid {feature_hw} is not what geometry_source {declared!r} makes "
                          f"for a {width} x {height} frame: {made}")
    known = {s: source_footprint(s, frame_hw, grid, merge) for s in ("vggt_crop", "vgllm", "vggt_pad")}
    vggt = ", ".join(f"{f.grid} {s}" for s, f in known.items() if f is not None)
    raise RecordError(f"geometry grid {feature_hw} does not match the image patch grid {grid} nor VGGT's "
                      f"grids for this {width} x {height} frame ({vggt}); features that cover the whole "
                      f"frame on another grid need \"geometry_source\": \"frame\"")


def _axis_samples(n_out: int, n_in: int, span: tuple[float, float]):
    """Bilinear taps along one axis: (lower index, upper index, upper weight) per output cell."""
    a, b = span
    position = a + (np.arange(n_out) + 0.5) * (b / n_out) - 0.5  # cell-centre index in the source
    position = np.clip(position, 0, n_in - 1)  # border cells beyond the edge, as align_corners=False
    low = np.floor(position).astype(np.int64)
    return low, np.minimum(low + 1, n_in - 1), (position - low).astype(np.float32)


def resample_geometry(features: np.ndarray, grid: tuple[int, int], span_y: tuple[float, float] | None = None,
                      span_x: tuple[float, float] | None = None) -> np.ndarray:
    """Features (Hf, Wf, C) -> (grid_h, grid_w, C) at the ViT patch centres, bilinear (rule above).

    Without spans the features cover the whole frame: the same numbers as
    F.interpolate(features, grid, mode="bilinear", align_corners=False). Matching grids with the
    whole-frame spans give the features back unchanged. Example: a 2 x 2 grid [[0, 1], [2, 3]] to
    4 x 4 -> first row [0, 0.25, 0.75, 1].
    """
    hf, wf, _ = features.shape
    span_y = (0.0, float(hf)) if span_y is None else tuple(map(float, span_y))
    span_x = (0.0, float(wf)) if span_x is None else tuple(map(float, span_x))
    if (hf, wf) == tuple(grid) and span_y == (0.0, float(hf)) and span_x == (0.0, float(wf)):
        return features
    y0, y1, wy = _axis_samples(grid[0], hf, span_y)
    x0, x1, wx = _axis_samples(grid[1], wf, span_x)
    f = np.asarray(features, dtype=np.float32)
    rows = f[y0] * (1 - wy)[:, None, None] + f[y1] * wy[:, None, None]  # (grid_h, Wf, C)
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def _geometry_arrays(path: str) -> tuple[np.ndarray, ...]:
    """The frames (Hp, Wp, C) float32 of one checked geometry file, in order, read-only; cached.

    A bad file raises its one line from `_read_geometry_arrays`' header check, so nothing is cached.
    """
    return cached_arrays(path, "geometry", _read_geometry_arrays)


def _read_geometry_arrays(path: str) -> list[np.ndarray]:
    kind, _ = geometry_header(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            order = _frame_keys(keys) if kind == "frames" else keys
            tensors = [f.get_tensor(k).float().numpy() for k in order]
    else:
        tensors = [np.load(path)]
    if kind == "array":
        tensors = list(tensors[0]) if tensors[0].ndim == 4 else tensors
    return [np.asarray(t, dtype=np.float32) for t in tensors]


def load_geometry_frames(record: dict) -> list[np.ndarray]:
    """A record's geometry features, one (Hp, Wp, C) float32 array per frame, files checked first."""
    geometry_frame_shapes(record)  # frame count, shapes, finite values: one line if wrong
    frames = []
    for path in _geometry_paths(record):
        frames += _geometry_arrays(path)
    return frames


def read_depth(path: str) -> np.ndarray:
    """A depth map in metres (H, W) float64, NaN where there is no measurement (0 or non-finite).

    16-bit PNG: millimetres (divided by DEPTH_PNG_SCALE); .npy: metres.
    """
    depth_hw(path)  # checked: readable, 16-bit or 2-D
    if path.endswith(".npy"):
        depth = np.load(path).astype(np.float64)
    else:
        from PIL import Image

        with Image.open(path) as image:
            depth = np.asarray(image, dtype=np.float64) / DEPTH_PNG_SCALE
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.nan)


def _pinhole(matrix: Any, scale_x: float = 1.0, scale_y: float = 1.0) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) of a 3x3 / 4x4 intrinsics matrix, for an image scaled by (scale_x, scale_y)."""
    m = np.asarray(matrix, dtype=np.float64)
    return m[0, 0] * scale_x, m[1, 1] * scale_y, m[0, 2] * scale_x, m[1, 2] * scale_y


def depth_points(record: dict, frame_hw: Sequence[tuple[int, int]], grids: Sequence[tuple[int, int]],
                 dim: int = 3) -> list[np.ndarray]:
    """Per-patch mean 3D points of each frame in the first frame's camera, on the ViT grids.

    Every depth pixel (u, v), centre (u + 0.5, v + 0.5) as in scenes.py, with depth z is
    back-projected, x = (u + 0.5 - cx) / fx * z, y likewise, moved by
    inverse(cam2global[0]) @ cam2global[f] into the first camera, and averaged over the ViT
    patch its centre falls in (the patch covers the same share of the depth map as of the
    frame). Pixels without depth are left out; a patch with none is (0, 0, 0). With dim 4 the
    fourth feature is the share of the patch's pixels with depth (1 for a full patch: scenes.py's
    (x, y, z, 1)). Intrinsics: `depth_cam2img` if given, else `cam2img` scaled from the frame's
    size (frame_hw) to the depth map's. Returns one float32 (grid_h, grid_w, dim) per frame.
    Example: a flat wall 2 m away, identity poses -> z = 2 in every patch.
    """
    if dim not in DEPTH_FEATURES:
        raise RecordError(f"3D points from 'depths' give {' or '.join(map(str, DEPTH_FEATURES))} features per "
                          f"patch, but the model's geometry merger takes {dim}")
    poses = [np.asarray(p, dtype=np.float64) for p in record["cam2global"]]
    to_first = np.linalg.inv(poses[0])
    out = []
    for path, (height, width), (gh, gw), pose in zip(record["depths"], frame_hw, grids, poses):
        depth = read_depth(resolve(record, path))
        hd, wd = depth.shape
        if record.get("depth_cam2img") is not None:
            fx, fy, cx, cy = _pinhole(record["depth_cam2img"])
        else:
            fx, fy, cx, cy = _pinhole(record["cam2img"], wd / width, hd / height)
        v, u = np.mgrid[0:hd, 0:wd].astype(np.float64) + 0.5
        camera = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], -1)
        transform = to_first @ pose
        points = camera @ transform[:3, :3].T + transform[:3, 3]
        # The ViT patch of each depth pixel's centre.
        rows = np.floor((np.arange(hd) + 0.5) * gh / hd).astype(np.int64)
        cols = np.floor((np.arange(wd) + 0.5) * gw / wd).astype(np.int64)
        patch = rows[:, None] * gw + cols[None, :]
        valid = np.isfinite(depth)
        n = gh * gw
        count = np.bincount(patch[valid], minlength=n)
        sums = np.stack([np.bincount(patch[valid], weights=points[..., k][valid], minlength=n)
                         for k in range(3)], -1)
        features = sums / np.maximum(count, 1)[:, None]
        if dim == 4:
            total = np.bincount(patch.ravel(), minlength=n)
            features = np.concatenate([features, (count / np.maximum(total, 1))[:, None]], -1)
        out.append(features.reshape(gh, gw, dim).astype(np.float32))
    return out


def _needed_dim(image_cfg) -> int | None:
    """Features per patch the model's geometry merger takes (ImageConfig.geometry_dim, set by
    model.load_model): 0 = the model has no prior, None = not known (every prior is read)."""
    return getattr(image_cfg, "geometry_dim", None)


def _missing_prior(dim: int) -> RecordError:
    return RecordError(f"no geometry prior, but the model fuses one ({dim} features per patch): give the "
                       "record 'geometry' (a features file) or 'depths' with cam2img and cam2global (3D points), "
                       "or load the model without its prior (--geometry off)")


def _check_feature_size(c: int, dim: int | None, path: str) -> None:
    if dim and c != dim:
        raise RecordError(f"geometry {path} has {c} features per patch; the model's geometry merger takes {dim} "
                          "(--geometry-dim)")


def geometry_features(record: dict, frame_hw: Sequence[tuple[int, int]], grids: Sequence[tuple[int, int]],
                      image_cfg) -> list[np.ndarray] | None:
    """The record's prior on its ViT grids, one (grid_h, grid_w, C) array per frame, or None.

    From `geometry` (resampled by the rule above), else from `depths` when the model's merger
    takes 3 or 4 features (`depth_points`). None when the model takes no prior (geometry_dim 0)
    or the record has none and the need is unknown; RecordError when the model needs one.
    """
    dim = _needed_dim(image_cfg)
    if dim == 0:
        return None
    if record.get("geometry"):
        frames = load_geometry_frames(record)
        _check_feature_size(frames[0].shape[2], dim, _geometry_paths(record)[0])
        out = []
        for features, hw, grid in zip(frames, frame_hw, grids):
            _, footprint = geometry_source(features.shape[:2], hw, grid, image_cfg.merge_size,
                                           record.get("geometry_source"))
            out.append(resample_geometry(features, grid, footprint.span_y, footprint.span_x))
        return out
    if record.get("depths") and dim:
        return depth_points(record, frame_hw, grids, dim)
    if dim:
        raise _missing_prior(dim)
    return None


# =====================================================================================
# Batching: chat template, visual placeholders, answer mask
# =====================================================================================

SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2.5-VL's special tokens, by name, so that prompts are built the same way for the toy model
# and for a real checkpoint (model.py gives the toy tokenizer exactly these).
PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # chat turns; <|im_end|> is the EOS of an answer
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]


def prompt_text(human: str, tokens_per_image: Sequence[int]) -> str:
    """The chat prompt (Qwen2.5's template) with each <image> expanded to its visual pad tokens."""
    pieces = human.split(IMAGE_PLACEHOLDER)
    text = pieces[0]
    for n, piece in zip(tokens_per_image, pieces[1:]):
        text += VISION_START + IMAGE_PAD * n + VISION_END + piece
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n")


def target_text(record: dict) -> str:
    """The completion SFT teaches: the record's answer in the <think></think><answer> format."""
    return wrap_answer(record["conversations"][1]["value"]) + IM_END


def record_frames(record: dict) -> list[np.ndarray]:
    """The frames of a record, (H, W, 3) uint8: its image files, or the sampled frames of its video."""
    if record.get("video") is not None:
        return read_video_at(resolve(record, record["video"]), record["frame_indices"])
    return [read_image(resolve(record, p)) for p in record["images"]]


def load_visual_inputs(record: dict, image_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pixel_values, image_grid_thw, geometry rows or None) of one record.

    The geometry rows come from `geometry_features` on the frames' ViT grids: a problem with
    them (a missing file, a grid that fits no rule, no prior for a model that needs one) is one
    RecordError / FileNotFoundError line naming the record.
    """
    images = record_frames(record)
    pixel_values, grids = images_to_patches(images, image_cfg)
    where = record.get("_where") or f"record {record.get('id')}"
    prior = _at(where, geometry_features, record, [image.shape[:2] for image in images],
                [tuple(g[1:]) for g in grids.tolist()], image_cfg)
    geometry = None if prior is None else geometry_to_tokens(prior, grids, image_cfg.merge_size)
    return pixel_values, grids, geometry


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device`; other entries (None geometry) as they are."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def collate(records: Sequence[dict], tokenizer, image_cfg, with_answer: bool = True) -> dict:
    """Build one model batch from records.

    Sequences are left-padded (so generation can continue every row at the same position);
    `loss_mask` is 1 on answer tokens (the completion, EOS included) and 0 on the prompt, the
    visual tokens and padding: the SFT loss (docs/DESIGN.md, "The method") uses only the answer.
    Returns input_ids, attention_mask, mm_token_type_ids, loss_mask (B, L); pixel_values,
    image_grid_thw, geometry (all frames of the batch, in order). With with_answer=False the
    completion starts at column input_ids.shape[1].
    """
    image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    merge2 = image_cfg.merge_size**2
    sequences, masks, pixels, grids, geometries = [], [], [], [], []
    for record in records:
        pixel_values, grid, geometry = load_visual_inputs(record, image_cfg)
        prompt_ids = tokenizer(prompt_text(record["conversations"][0]["value"],
                                           (grid.prod(-1) // merge2).tolist()), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(target_text(record), add_special_tokens=False)["input_ids"] if with_answer else []
        sequences.append(prompt_ids + answer_ids)
        masks.append([0] * len(prompt_ids) + [1] * len(answer_ids))
        pixels.append(pixel_values)
        grids.append(grid)
        geometries.append(geometry)
    length = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(s)) + s for s in sequences])
    attention_mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in sequences])
    loss_mask = torch.tensor([[0] * (length - len(m)) + m for m in masks])
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        # 1 marks image pad tokens: without it Qwen2.5-VL silently drops its 3-D rotary positions.
        "mm_token_type_ids": (input_ids == image_pad_id).long(),
        "loss_mask": loss_mask,
        "pixel_values": torch.cat(pixels),
        "image_grid_thw": torch.cat(grids),
        "geometry": None if any(g is None for g in geometries) else torch.cat(geometries),
    }
    return batch
