"""Data: frame sampling, records, prompts and batching (3D-RFT section 3, "Data"; VG LLM data format).

3D-RFT inherits its data format from VG LLM: a sample is a handful of video frames plus a
conversation, stored as one JSON line. The model answers in text; the ground truth needed by the
verifiable rewards (3D boxes, the target frame, the QA answer) travels in the same record.

A record (one line of `<split>/<task>.jsonl`) looks like:

    {"id": "det-000012-0", "task": "detection",
     "images": ["scenes/000012/frames/003.png", ...],      # paths relative to the jsonl's folder
     "geometry": "geometry/det-000012-0.npy",             # optional: per-patch prior, (F, Hp, Wp, C)
     "conversations": [{"from": "human", "value": "<image><image>...\nDetect the 3D ..."},
                       {"from": "gpt", "value": "[{\"label\":\"chair\",\"bbox_3d\":[...]}]"}],
     "boxes": [{"label": "chair", "bbox_3d": [x, y, z, dx, dy, dz, yaw, roll, pitch]}],  # detection
     "gt_bbox": [...], "gt_frame": 2, "target": "chair", "description": "...",          # grounding
     "question_type": "object_counting", "answer": "3",                                   # spatial
     "cam2img": 4x4, "cam2global": [4x4 per sampled frame], "axis_align_matrix": 4x4}

Each `<image>` in the human turn stands for one frame, in order. This file is free of anything
specific to the synthetic world, so that real ScanNet / ScanRefer / VSI-Bench records go through the
same code: only the data directory changes.

Sections: prompt texts -> frame sampling -> record loading -> images and geometry -> batching.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

# =====================================================================================
# Prompt texts (exactly the VG LLM / 3D-RFT wording, docs/DESIGN.md "Records and prompts")
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
SPATIAL_PREFIX = "These are frames of a video. {question}"
SPATIAL_NUMERIC_SUFFIX = "Please answer the question using a single word or phrase."
SPATIAL_MC_SUFFIX = "Options: {options} Answer with the option's letter from the given choices directly."

# VSI-Bench question types: numeric ones are scored by MRA, the others are multiple choice.
NUMERIC_QUESTION_TYPES = (
    "object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
)
MC_QUESTION_TYPES = (
    "object_rel_distance", "object_rel_direction", "obj_appearance_order", "route_planning",
)


# Completion length budget per task (new tokens) for sampling in grpo.py and decoding in eval.py
# when --max-new-tokens is not given. A detection answer of the toy tokenizer takes ~50 tokens
# per box (the fixed JSON pieces are single tokens, digits are one token each); a grounding
# answer is one box; a spatial answer is a letter or a number plus the four tags. Real
# checkpoints (longer tokenisation of the tags, many ScanNet objects) may need more.
DEFAULT_MAX_NEW_TOKENS = {"detection": 400, "grounding": 96, "spatial": 32}


def detection_prompt(num_frames: int) -> str:
    """Human turn of a detection sample: one <image> per frame, then the instruction."""
    return IMAGE_PLACEHOLDER * num_frames + "\n" + DETECTION_PROMPT


def grounding_prompt(num_frames: int, description: str) -> str:
    """Human turn of a grounding sample: frames prefixed "Frame-i: " so the answer can name one."""
    frames = "".join(f"Frame-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(num_frames))
    return frames + GROUNDING_PROMPT.format(desc=description)


def spatial_prompt(num_frames: int, question: str, options: Sequence[str] | None = None) -> str:
    """Human turn of a VSI-Bench style question; `options` like ["A. sofa", "B. table"] for MC."""
    text = IMAGE_PLACEHOLDER * num_frames + "\n" + SPATIAL_PREFIX.format(question=question)
    if options:
        return text + " " + SPATIAL_MC_SUFFIX.format(options=" ".join(options))
    return text + " " + SPATIAL_NUMERIC_SUFFIX


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
# Frame sampling
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


def read_video_frames(path: str, k: int, mode: str = "uniform", stride: int = 1, start: int = 0) -> list[np.ndarray]:
    """Sample k frames (H, W, 3 uint8) of a video file or a folder of images.

    Video files are decoded with PyAV (`pip install av`, optional): it is the only decoder that
    works next to this CPU torch (torchvision cannot be installed: docs/DESIGN.md, "Platform facts").
    """
    if os.path.isdir(path):
        files = list_frame_files(path)
        return [read_image(files[i]) for i in sample_frame_indices(len(files), k, mode, stride, start)]
    if not os.path.exists(path):
        raise FileNotFoundError(f"video not found: {path}")
    try:
        import av  # optional extra
    except ImportError:
        raise RuntimeError(f"reading {path} needs PyAV: pip install av (or pass a folder of frames)") from None
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no video frames decoded from {path}")
    return [frames[i] for i in sample_frame_indices(len(frames), k, mode, stride, start)]


def read_image(path: str) -> np.ndarray:
    """One frame as an (H, W, 3) uint8 array (Pillow reads PNG and JPEG)."""
    from PIL import Image

    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# =====================================================================================
# Records
# =====================================================================================


class RecordError(ValueError):
    """A malformed data record; the message names the file and line."""


REQUIRED_KEYS = {
    "detection": ("images", "conversations", "boxes"),
    "grounding": ("images", "conversations", "gt_bbox", "gt_frame", "cam2global", "axis_align_matrix"),
    "spatial": ("images", "conversations", "question_type", "answer"),
}


def check_record(record: Any, where: str) -> dict:
    """Validate one record's structure; raise RecordError with `where` (file:line) on a problem."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    task = record.get("task")
    if task not in TASKS:
        raise RecordError(f"{where}: 'task' must be one of {TASKS}, got {task!r}")
    missing = [key for key in REQUIRED_KEYS[task] if key not in record]
    if missing:
        raise RecordError(f"{where}: {task} record lacks key(s) {missing}")
    images = record["images"]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
        raise RecordError(f"{where}: 'images' must be a non-empty list of paths")
    turns = record["conversations"]
    if (not isinstance(turns, list) or len(turns) < 2
            or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2])):
        raise RecordError(f"{where}: 'conversations' must hold a human and a gpt turn with string 'value'")
    n_placeholders = turns[0]["value"].count(IMAGE_PLACEHOLDER)
    if n_placeholders != len(images):
        raise RecordError(f"{where}: {n_placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    if task == "grounding" and len(record["cam2global"]) != len(images):
        raise RecordError(f"{where}: 'cam2global' needs one 4x4 pose per image")
    return record


def load_records(path: str, task: str | None = None, limit: int | None = None) -> list[dict]:
    """Read a JSON-lines file of records; image/geometry paths become absolute.

    `path` is a .jsonl file, or a split folder together with `task` (reads `<folder>/<task>.jsonl`).
    Each record gains `_root`, the folder its relative paths start from.
    """
    if os.path.isdir(path):
        if task is None:
            raise ValueError(f"{path} is a folder: name the task ({', '.join(TASKS)})")
        path = os.path.join(path, f"{task}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"records not found: {path} (generate the toy data with: python scenes.py)")
    stem = os.path.splitext(os.path.basename(path))[0]
    task = task if task is not None else (stem if stem in TASKS else None)
    root = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e.msg})") from None
            if task is not None and isinstance(record, dict):
                record.setdefault("task", task)  # real VG LLM records carry no "task" key
            record = check_record(record, where)
            record["_root"] = root
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise RecordError(f"{path}: no records")
    return records


def resolve(record: dict, relative: str) -> str:
    """A path of a record, relative to its jsonl file's folder (absolute paths stay as they are)."""
    return relative if os.path.isabs(relative) else os.path.join(record.get("_root", "."), relative)


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


def load_visual_inputs(record: dict, image_cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(pixel_values, image_grid_thw, geometry rows or None) of one record."""
    images = [read_image(resolve(record, p)) for p in record["images"]]
    pixel_values, grids = images_to_patches(images, image_cfg)
    geometry = None
    if record.get("geometry"):
        path = resolve(record, record["geometry"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"geometry file not found: {path} (record {record.get('id')})")
        prior = np.load(path)
        if prior.ndim != 4 or prior.shape[0] != len(images):
            raise RecordError(f"{path}: geometry must be (frames={len(images)}, Hp, Wp, C), got {prior.shape}")
        geometry = geometry_to_tokens(prior, grids, image_cfg.merge_size)
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
