"""The model: a Qwen2.5-VL policy with a geometry prior added to its visual tokens (3D-RFT section 3.1).

3D-RFT starts from VG LLM: Qwen2.5-VL plus a frozen geometry encoder (VGGT). VGGT's per-patch
features, 2x2 neighbours concatenated, pass through a small "geometry merger"

    RMSNorm -> Linear -> GELU -> Linear

and are *added* to Qwen's visual tokens after Qwen's own merger. Since the geometry encoder is frozen,
its features can be computed offline; here the prior is simply a per-patch feature tensor that the
data loader hands over (VGGT features for real data, per-patch 3D points for the synthetic world).

This file offers:
- `load_model(name_or_dir)`: "toy" builds a tiny Qwen2.5-VL-class model from a config, with a small
  tokenizer made offline; a directory loads a local Hugging Face checkpoint (never the hub).
- `RFTModel`: the policy = the Hugging Face model + the geometry merger, with `vision_tokens`
  (the frozen ViT: per-prompt work, done once and reusable), `fuse_geometry`, `forward`, `generate`.
- `save_model(model, tokenizer, image_config, dir)`: safetensors weights, config and tokenizer in one directory
  that `load_model` reads back.
- `ImageConfig`: the numbers needed to turn frames into `pixel_values` by hand (transformers'
  Qwen2.5-VL image processor needs torchvision, which cannot be installed next to this torch),
  plus the model's `geometry_dim`, so that the data code asks every record for the prior it needs.
- `geometry_from_flags(--geometry, --geometry-dim)`: the scripts' switch -> load_model's
  (geometry, geometry_dim); `load_model(..., geometry=True, geometry_dim=C)` adds a merger for C
  features per patch to a checkpoint that has none (zero-initialised) or to the toy.
- Memory for a real model: `load_model(..., dtype=torch.bfloat16)`, `enable_gradient_checkpointing`,
  `load_reference` (a frozen low-precision copy for the KL term).
- A hand-written LoRA: `add_lora`, `adapters_disabled` (the base model, i.e. the KL reference, from
  the same weights), `merge_lora`, `lora_parameters`; `save_model` / `load_model` carry adapters.
- A broken checkpoint folder (missing or corrupt weights, bad config.json, no tokenizer) is a
  FileNotFoundError / ValueError of one line naming the file, raised before transformers reads it.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import logging as hf_logging

import data  # the record format: prompt wording and the chat template's special tokens
from data import (FORMAT_TAGS, IM_END, IMAGE_PAD, PAD_TOKEN, SPECIAL_TOKENS, VIDEO_PAD, VISION_END,
                  VISION_START)

# =====================================================================================
# Toy tokenizer pieces (the chat template's special tokens and the answer-format tags live
# in data.py, where the prompts are built)
# =====================================================================================

# The toy tokenizer also keeps the fixed JSON pieces of answers whole: shorter completions make
# CPU rollouts cheaper (a real Qwen tokenizer has its own merges for them).
TOY_JSON_PIECES = ['{"label":"', '","bbox_3d":[', "]}", '{"frame":', ',"bbox_3d":[']
# ...and writes every answer number below 10 in magnitude (all of the toy world's; 2 decimals,
# data.format_number) as exactly two tokens: the signed integer part with its point ("-0.", "2.")
# and the two decimals ("05"); larger numbers still encode, in more pieces. Fixed-width
# numbers put the k-th box coordinate at a fixed token offset from "[", which a 4-layer model
# can find by relative position; with one token per character a minus sign shifted every
# later coordinate by one. Added tokens match leftmost-longest, so "2.05" -> "2." + "05".
TOY_NUMBER_PIECES = [f"{sign}{i}." for sign in ("", "-") for i in range(10)] + [f"{i:02d}" for i in range(100)]

GEOMETRY_FILE = "geometry_merger.safetensors"  # saved next to the Hugging Face weights
RFT_CONFIG_FILE = "rft3d.json"  # what this project adds to a checkpoint (geometry dim, image config)
# --geometry of sft.py, grpo.py and eval.py: keep the checkpoint's setting, force the prior on, or drop it
GEOMETRY_FLAG = {"auto": None, "on": True, "off": False}


def geometry_from_flags(flag: str = "auto", dim: int | None = None) -> tuple[bool | None, int | None]:
    """--geometry {auto,on,off} and --geometry-dim D -> load_model's (geometry, geometry_dim).

    auto: the checkpoint's setting (the toy's prior is on); on: the prior, the checkpoint's merger
    if it has one of D inputs (or D is not given), else a fresh zero-initialised merger for D
    features per patch (D is then required: e.g. 2048 for VGGT-1B features, 3 or 4 for 3D points
    from depth); off: no prior. D goes with on only: with auto it would silently replace a saved
    merger of another size, with off it contradicts it. ValueError (one line) for D < 1 or D
    without on. Example: geometry_from_flags("on", 2048) -> (True, 2048).
    """
    if flag not in GEOMETRY_FLAG:
        raise ValueError(f"--geometry must be one of {', '.join(GEOMETRY_FLAG)}, got {flag!r}")
    if dim is None:
        return GEOMETRY_FLAG[flag], None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"--geometry-dim must be a positive integer (features per patch), got {dim!r}")
    if flag != "on":
        raise ValueError(f"--geometry-dim {dim} sizes a geometry merger: it needs --geometry on (got --geometry {flag})")
    return True, dim


def saved_geometry_dim(name_or_dir: str) -> int | None:
    """Features per patch of the geometry merger a model comes with (0: none), read from its
    rft3d.json without loading it; None when that cannot be told here (no such folder, an
    unreadable file: `load_model` then names the problem). Example: saved_geometry_dim("toy") == 4;
    a checkpoint from the hub (no rft3d.json) -> 0."""
    if name_or_dir == "toy":
        return ToySize().geometry_dim
    if not os.path.isfile(os.path.join(name_or_dir, "config.json")):
        return None
    extra_file = os.path.join(name_or_dir, RFT_CONFIG_FILE)
    try:
        dim = read_json_object(extra_file).get("geometry_dim", 0) if os.path.exists(extra_file) else 0
    except ValueError:
        return None
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 else None


# =====================================================================================
# Image configuration: what a hand-written Qwen2.5-VL "processor" needs
# =====================================================================================


@dataclass
class ImageConfig:
    """Patchification numbers of the Qwen2.5-VL vision tower (and its image processor).

    Each image becomes a grid of patch_size x patch_size patches, repeated temporal_patch_size
    times in time (a still image is a 2-frame clip to the ViT); merge_size x merge_size patches
    become one LLM token. A 112 x 112 frame with patch 14 and merge 2 gives an 8 x 8 patch grid
    and 16 visual tokens.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448  # frames larger than this are resized down (real data)
    # Features per patch the model's geometry merger takes: 0 = no prior, None = not known. Not a
    # pixel setting and not saved: `load_model` sets it from the model, so that the data code
    # (data.collate, data.check_lengths) knows whether every record needs a prior, of what size,
    # and may make one from depth maps. Example: load_model("toy")[2].geometry_dim == 4.
    geometry_dim: int | None = None


def image_config_from_dir(path: str, config: Qwen2_5_VLConfig) -> ImageConfig:
    """Read `preprocessor_config.json` of a real checkpoint when present, else use the defaults.

    The pixel budget is written two ways: older checkpoints say `min_pixels` / `max_pixels`, newer
    transformers save `size: {"shortest_edge", "longest_edge"}`, which despite the names are the
    same two pixel counts. Both are read; the explicit min/max_pixels win, as in transformers.
    """
    vision = config.vision_config
    image_config = ImageConfig(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    processor_file = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(processor_file):
        processor = read_json_object(processor_file)
        size = processor.get("size") if isinstance(processor.get("size"), dict) else {}
        for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if size.get(size_key):
                setattr(image_config, key, size[size_key])
        for key in ("image_mean", "image_std", "min_pixels", "max_pixels"):
            if processor.get(key) is not None:   # an explicit null means "not set", as in transformers
                value = processor[key]
                setattr(image_config, key, tuple(value) if isinstance(value, list) else value)
        # Checked here, not when the first frame is resized (a string budget fails deep in data.py).
        budget_ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                        for v in (image_config.min_pixels, image_config.max_pixels))
        stats_ok = all(isinstance(s, tuple) and len(s) == 3 and all(isinstance(x, (int, float)) for x in s)
                       for s in (image_config.image_mean, image_config.image_std))
        if not (budget_ok and stats_ok):
            raise ValueError(f"{processor_file}: min_pixels / max_pixels must be positive integers and "
                             f"image_mean / image_std lists of 3 numbers")
    return image_config


# =====================================================================================
# The geometry prior fusion (VG LLM's geometry merger)
# =====================================================================================


def geometry_merger(in_dim: int, hidden_dim: int, out_dim: int, zero_init: bool = True) -> nn.Sequential:
    """RMSNorm -> Linear -> GELU -> Linear, mapping 2x2-concatenated patch features to LLM width.

    With zero_init the last layer starts at zero, so switching the prior on leaves a pretrained
    model's outputs unchanged at step 0; training then learns how much geometry to add. A model
    trained from scratch (the toy one) starts with the default init instead, so the prior counts
    from the first step (measured: a zero-initialised toy merger was still nearly ignored after
    800 SFT steps).
    """
    merger = nn.Sequential(
        nn.RMSNorm(in_dim, eps=1e-6),
        nn.Linear(in_dim, hidden_dim),
        nn.GELU(),
        nn.Linear(hidden_dim, out_dim),
    )
    if zero_init:
        nn.init.zeros_(merger[3].weight)
        nn.init.zeros_(merger[3].bias)
    return merger


class PatchProjection(nn.Conv3d):
    """Qwen's patch embedding (a Conv3d whose stride equals its kernel) computed as one matmul.

    Each output is the dot product of one (C, T, P, P) patch with each filter: exactly a linear
    layer over the flattened patch, with the filters flattened the same way. `F.linear` does it
    in one GEMM where the CPU convolution is slow (measured here, forward + backward of 3,072
    patches: 112 -> 19 ms at the toy's width 64, 2.96 -> 0.22 s at Qwen2.5-VL-3B's 1,280; results
    within 5e-6). The weight, its shape and name stay the convolution's, so checkpoints, the
    hub's files and `load_state_dict` are unchanged. Example: patches (N, 3, 2, 14, 14) and
    weight (D, 3, 2, 14, 14) -> (N, D, 1, 1, 1), as the convolution returns.
    """

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        flat = F.linear(patches.flatten(1), self.weight.flatten(1), self.bias)
        return flat.view(flat.shape[0], -1, 1, 1, 1)


def use_patch_matmul(lm: Qwen2_5_VLForConditionalGeneration) -> None:
    """Swap the ViT's patch Conv3d for `PatchProjection` in place (same module, same parameters)."""
    proj = lm.model.visual.patch_embed.proj
    if (type(proj) is nn.Conv3d and tuple(proj.stride) == tuple(proj.kernel_size) and proj.padding == (0, 0, 0)
            and proj.groups == 1 and tuple(proj.dilation) == (1, 1, 1)):
        proj.__class__ = PatchProjection


def repeat_rows(t: torch.Tensor, copies: list[int], dim: int = 0) -> torch.Tensor:
    """Entry b of `t` along `dim` repeated copies[b] times, in order (repeat_interleave by counts).

    Written as `expand` views concatenated, whose backward is a plain sum: with a gather by an
    index tensor instead, two identical runs were seen to differ in the last bits, and an exact
    resume needs them equal. Example: rows [a, b], copies [2, 1] -> [a, a, b].
    """
    return torch.cat([row.expand(*(n if i == dim else size for i, size in enumerate(row.shape)))
                      for row, n in zip(t.split(1, dim), copies)], dim)


def copy_cache_rows(cache, copies: list[int]):
    """A prompt batch's KV cache with row b copied copies[b] times (the shared work of a group).

    Used by sampling (`prefill`, no gradients) and by scoring (`_score_continuations`, where
    autograd sums the copies' gradients back into the prompt's pass). Hugging Face's dynamic
    cache keeps one (batch, heads, positions, head_dim) key and value tensor per layer.
    """
    for layer in cache.layers:
        layer.keys, layer.values = repeat_rows(layer.keys, copies), repeat_rows(layer.values, copies)
    return cache


class RFTModel(nn.Module):
    """The policy: a Hugging Face Qwen2.5-VL model plus an optional geometry merger.

    One module (rather than two) so that DDP / FSDP, the optimiser and checkpoints see a single
    set of parameters. `lm` is the untouched Hugging Face model.
    """

    def __init__(self, lm: Qwen2_5_VLForConditionalGeneration, geometry_dim: int = 0, zero_init: bool = True):
        super().__init__()
        use_patch_matmul(lm)  # the same patch embedding, one GEMM instead of a slow convolution
        self.lm = lm
        self.geometry_dim = geometry_dim  # features per patch; 0 = no geometry prior
        if geometry_dim > 0:
            width = lm.config.text_config.hidden_size
            merge = lm.config.vision_config.spatial_merge_size
            self.geometry_merger = geometry_merger(geometry_dim * merge * merge, width, width, zero_init)
        # False inside `adapters_disabled`: the LoRA branches are skipped and the geometry merger's
        # frozen starting copy (`reference_merger`, made by `add_lora`) stands in for the trained one.
        self.adapters_enabled = True

    # ---------------- the per-prompt work: frames (+ geometry) -> visual tokens ----------------

    def vision_tokens(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Qwen's ViT + merger: one row per visual LLM token, all frames of the batch concatenated.

        pixel_values: (num_patches, C * T * P * P) from `data.images_to_patches`. When the ViT is
        frozen (the paper's setting), this is per-prompt work that GRPO does once per group.
        """
        vision = self.lm.model.visual
        return vision(pixel_values.to(vision.dtype), grid_thw=image_grid_thw, return_dict=True).pooler_output

    def fuse_geometry(
        self, tokens: torch.Tensor, image_grid_thw: torch.Tensor, geometry: torch.Tensor | None
    ) -> BaseModelOutputWithPooling:
        """Add the geometry merger's output to the visual tokens (VG LLM's fusion by addition).

        geometry: (num_visual_tokens, geometry_dim * merge^2) from `data.geometry_to_tokens`.
        Returns what the Hugging Face model accepts as `mm_encoder_outputs["image"]`: a tuple of
        per-image token tensors in `pooler_output`.
        """
        if self.geometry_dim > 0:
            if geometry is None:
                raise ValueError(f"this model fuses a geometry prior ({self.geometry_dim} features per patch) but "
                                 "the batch carries none: give each record 'geometry' or 'depths' (data.collate "
                                 "names the record when image_config.geometry_dim is set, as load_model does)")
            width = self.geometry_merger[1].in_features
            if geometry.dim() != 2 or geometry.shape != (tokens.shape[0], width):
                raise ValueError(f"geometry rows {tuple(geometry.shape)} do not fit {tokens.shape[0]} visual tokens "
                                 f"x {width} merger inputs ({self.geometry_dim} features x merge^2 patches)")
            # With LoRA the merger trains in full, so the base model (the KL reference) needs the
            # merger as it was when the adapters were added: `reference_merger`.
            merger = self.geometry_merger
            if not self.adapters_enabled and "reference_merger" in self._modules:
                merger = self.reference_merger
            tokens = tokens + merger(geometry.to(tokens.dtype))
        merge = self.lm.config.vision_config.spatial_merge_size
        split_sizes = (image_grid_thw.prod(-1) // merge**2).tolist()
        return BaseModelOutputWithPooling(pooler_output=torch.split(tokens, split_sizes))

    def encode_images(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, geometry: torch.Tensor | None = None
    ) -> BaseModelOutputWithPooling:
        """Frames (+ geometry) -> fused visual tokens, ready for `forward` or `generate`."""
        return self.fuse_geometry(self.vision_tokens(pixel_values, image_grid_thw), image_grid_thw, geometry)

    # ---------------- the per-sequence work: the language model ----------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        image_grid_thw: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        geometry: torch.Tensor | None = None,
        vision: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        completion_ids: torch.Tensor | None = None,
        copies: list[int] | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab). Pass precomputed `vision` (from `vision_tokens`) to skip the ViT.

        `logits_to_keep` = k > 0 returns only the last k positions' logits, (batch, k, vocab): the
        LM head then never materialises (batch x sequence x vocabulary) numbers, which for a real
        152k vocabulary and thousands of visual tokens would not fit in memory. 0 keeps all.

        With `completion_ids` (rows, T) and `copies` (one count per prompt, summing to rows), the
        batch holds distinct prompts and the rows continue them in order, `copies[b]` rows for
        prompt b: see `_score_continuations`. (A mode of `forward` so that DDP, which hooks
        `forward` only, sees the call.)
        """
        if vision is None:
            vision = self.vision_tokens(pixel_values, image_grid_thw)
        image_embeds = self.fuse_geometry(vision, image_grid_thw, geometry)
        # Reset the cached rope offsets: they belong to the last `generate` call, not this batch.
        self.lm.model.rope_deltas = None
        if completion_ids is not None:
            prompt = {"input_ids": input_ids, "attention_mask": attention_mask,
                      "mm_token_type_ids": mm_token_type_ids, "image_grid_thw": image_grid_thw}
            return self._score_continuations(prompt, image_embeds, completion_ids, copies)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            mm_encoder_outputs={"image": image_embeds},
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        return out.logits

    def _score_continuations(
        self, prompt: dict, image_embeds: BaseModelOutputWithPooling, completion_ids: torch.Tensor,
        copies: list[int],
    ) -> torch.Tensor:
        """Logits scoring each completion token, (rows, T, vocab), with every prompt run once.

        Position t of the result predicts completion token t: position 0 is the prompt's last
        token. It equals running each row's prompt + completion through `forward` and keeping the
        last T + 1 positions but one; the GRPO parity test checks values and gradients. In video
        GRPO a prompt is hundreds to thousands of tokens and a completion tens, so the G rows of a
        group share the prompt's pass (the training analogue of `prefill`):
          1. per prompt: the prompt once, keeping its KV cache (with gradients) and the last logits;
          2. per completion: each prompt's cache rows copied over its completions (autograd sums
             the copies' gradients back into the prompt's pass), then the completion's own tokens.
        The prompts must be left-padded (as `grpo.stack_prompts` does), so that each one's last
        position is its last real token.
        """
        if copies is None or sum(copies) != len(completion_ids) or len(copies) != len(prompt["input_ids"]):
            raise ValueError("copies must give, for each prompt, how many completion rows continue it")
        P, T = prompt["input_ids"].shape[1], completion_ids.shape[1]
        # Qwen's 3-D rotary positions of prompt + completion, once per prompt: completion tokens
        # are text, so their positions do not depend on which tokens they are (placeholder 0s).
        positions, _ = self.lm.model.get_rope_index(
            F.pad(prompt["input_ids"], (0, T)), mm_token_type_ids=F.pad(prompt["mm_token_type_ids"], (0, T)),
            image_grid_thw=prompt["image_grid_thw"], attention_mask=F.pad(prompt["attention_mask"], (0, T), value=1),
        )
        first = self.lm(**prompt, position_ids=positions[:, :, :P], mm_encoder_outputs={"image": image_embeds},
                        use_cache=True, logits_to_keep=1)
        logits = repeat_rows(first.logits, copies)  # predicts completion token 0
        if T <= 1:
            return logits[:, :T]
        cache = copy_cache_rows(first.cache, copies)
        # The last completion token predicts nothing that is scored, so it is not fed.
        rest = self.lm(
            input_ids=completion_ids[:, :-1],
            attention_mask=torch.cat([repeat_rows(prompt["attention_mask"], copies),
                                      prompt["attention_mask"].new_ones(len(completion_ids), T - 1)], 1),
            position_ids=repeat_rows(positions, copies, dim=1)[:, :, P:-1],
            cache=cache,
            use_cache=True,
        )
        return torch.cat([logits, rest.logits], 1)

    @torch.no_grad()
    def generate(self, batch: dict, image_embeds: BaseModelOutputWithPooling | None = None, **kwargs) -> torch.Tensor:
        """Sample (or greedily decode) completions; returns only the new token ids (batch*n, new).

        The frames are encoded once here, then Hugging Face's `generate` decodes every row with
        its KV cache on (evaluation's greedy decoding). GRPO's rollouts do not come here: they
        prefill each prompt once and copy its cache over the group (`prefill`, `generate_from`).
        """
        if image_embeds is None:
            image_embeds = self.encode_images(batch["pixel_values"], batch["image_grid_thw"], batch.get("geometry"))
        self.lm.model.rope_deltas = None
        out = self.lm.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            mm_encoder_outputs={"image": image_embeds},
            **kwargs,
        )
        return out[:, batch["input_ids"].shape[1]:]

    @torch.no_grad()
    def prefill(self, batch: dict, image_embeds: BaseModelOutputWithPooling, copies: int) -> tuple:
        """Run each prompt once and copy its KV cache `copies` times: the shared work of a group.

        All but the last prompt token go through the model (visual tokens included); the cache
        rows are then repeated prompt-major (row = b * copies + g), together with Qwen's rope
        offsets (the 3-D positions of the visual tokens leave each prompt's text positions
        shifted by a per-prompt delta, which decoding must keep adding). `generate_from` then
        decodes from the last prompt token. Returns (cache, rope_deltas).
        """
        self.lm.model.rope_deltas = None
        out = self.lm(
            input_ids=batch["input_ids"][:, :-1],
            attention_mask=batch["attention_mask"][:, :-1],
            mm_token_type_ids=batch["mm_token_type_ids"][:, :-1],
            image_grid_thw=batch["image_grid_thw"],
            mm_encoder_outputs={"image": image_embeds},
            use_cache=True,
            logits_to_keep=1,  # the logits are not needed, only the cache
        )
        cache = copy_cache_rows(out.cache, [copies] * len(batch["input_ids"]))
        return cache, self.lm.model.rope_deltas.repeat_interleave(copies, dim=0)

    @torch.no_grad()
    def generate_from(self, batch: dict, prefilled: tuple, copies: int, **kwargs) -> torch.Tensor:
        """Decode `copies` completions per prompt from `prefill`'s cache; (batch*copies, new).

        Only the last prompt token is new to the model here, so no visual input is passed: the
        cache already holds the frames. Rows are prompt-major, as in `prefill`.
        """
        cache, rope_deltas = prefilled
        self.lm.model.rope_deltas = rope_deltas
        repeat = lambda t: t.repeat_interleave(copies, dim=0)
        out = self.lm.generate(
            input_ids=repeat(batch["input_ids"]),
            attention_mask=repeat(batch["attention_mask"]),
            mm_token_type_ids=repeat(batch["mm_token_type_ids"]),
            cache=cache,
            **kwargs,
        )
        return out[:, batch["input_ids"].shape[1]:]


# =====================================================================================
# The tiny model and its offline tokenizer
# =====================================================================================

# Text the toy tokenizer learns its merges from: the prompt wording, JSON keys, categories, colours
# and the spatial-QA vocabulary. Words seen here become one token each (with their leading space);
# anything else still encodes, letter by letter.
TOY_CORPUS = """
system user assistant You are a helpful assistant. Reason inside and give the final answer
Detect the bounding boxes in camera coordinate system of first frame Output json list where each
entry contains object name label its box bbox format should be x y z center size yaw roll pitch
Localize clear video showing described text Text JSON dictionary with index frames coordinates
These are Please question using single word or phrase Options Answer option letter from given
choices directly How many is are there this room What distance between meters centimeters square
length width height longest dimension which closest farthest to nearest larger smaller left right
back front behind facing standing by If I am order first appear appears appearance following
chair chairs table tables sofa sofas bed beds cabinet cabinets lamp lamps plant plants tv tvs
red green blue yellow orange purple white black brown pink gray cyan in of on at for measured
measuring point objects object the a an size taller shorter centre center the of
Which What Where How Is If Measuring From Answer Frame
"""


# The prompt wording the toy vocabulary was trained on, frozen: BPE ids depend on the exact
# training text, and the toy model's initial weights (so the demo's figures) on the ids. The
# spatial texts are the project's earlier one-line layout; data.py now uses VSI-Bench's layout
# (one part per line), which has the same words, so every prompt still encodes the same way.
TOY_PROMPT_TEXTS = (
    data.DETECTION_PROMPT, data.GROUNDING_PROMPT, "These are frames of a video. {question}",
    data.SPATIAL_NUMERIC_SUFFIX, "Options: {options} Answer with the option's letter from the given choices directly.",
    data.SYSTEM_PROMPT,
)


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained offline, in milliseconds, on TOY_CORPUS and the prompt texts.

    Pre-tokenisation keeps a word together with its leading space (" chair") and every other
    character alone, so digits stay single characters as in Qwen's own tokenizer and every ASCII
    text still encodes. BPE training then merges each word of the corpus into one token. Decoding
    concatenates tokens as they are. Training is deterministic: the same corpus, the same vocabulary.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [TOY_CORPUS, *TOY_PROMPT_TEXTS]
    words = sorted(set(re.findall(r"[A-Za-z]+", " ".join(corpus))))
    corpus += ["\n".join(words), " ".join(words)]  # every word with and without a leading space
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+|[^A-Za-z]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    alphabet = [chr(code) for code in range(32, 127)] + ["\n"]
    trainer = trainers.BpeTrainer(vocab_size=4000, min_frequency=1, special_tokens=["[UNK]"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens([*FORMAT_TAGS, *TOY_JSON_PIECES, *TOY_NUMBER_PIECES])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token=PAD_TOKEN, eos_token=IM_END,
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )


@functools.lru_cache(maxsize=1)
def _toy_vocabulary() -> tuple[tuple[str, int], ...]:
    return tuple(sorted(build_toy_tokenizer().get_vocab().items()))


def is_toy_tokenizer(tokenizer: PreTrainedTokenizerFast) -> bool:
    """Is this the toy BPE (`build_toy_tokenizer`: "toy", or a checkpoint trained from it)?

    Decided by the vocabulary, token for token (the toy's is rebuilt once, in milliseconds):
    what the completion budgets of a model depend on (`data.max_new_tokens`) is how its
    tokenizer cuts answers, and only the toy's has the JSON pieces and the format tags as single
    tokens. A real Qwen vocabulary (151,665 tokens) differs in size at once.
    """
    if len(tokenizer) != len(_toy_vocabulary()):
        return False
    return tuple(sorted(tokenizer.get_vocab().items())) == _toy_vocabulary()


@dataclass
class ToySize:
    """Size of the tiny Qwen2.5-VL (0.7 M parameters with the default numbers).

    Small on purpose: at this size the CPU demo reproduces the paper's ablation (SFT -> GRPO
    beats SFT -> more SFT at equal wall time, docs/EXPERIMENTS.md item 21), while the earlier default, 4
    layers of width 128 (1.7 M), tied there (items 11-20).
    """

    hidden: int = 64  # LLM width
    layers: int = 2  # LLM decoder layers
    heads: int = 2  # attention heads (head_dim = hidden / heads = 32)
    kv_heads: int = 1  # grouped-query attention, as in Qwen2.5
    vision_hidden: int = 96  # ViT width
    vision_layers: int = 2  # ViT depth
    geometry_dim: int = 4  # features per patch of the toy prior (x, y, z, 1)


def toy_config(tokenizer: PreTrainedTokenizerFast, size: ToySize) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config scaled down, respecting the architecture's constraints (docs/DESIGN.md, "Platform facts")."""
    head_dim = size.hidden // size.heads
    # mrope_section splits the rotary frequencies between (time, height, width) and must sum to
    # head_dim / 2; Qwen2.5-VL uses the ratio 1/4 : 3/8 : 3/8 (16, 24, 24 for head_dim 128).
    half = head_dim // 2
    spatial = (half - half // 4) // 2
    mrope_section = [half - 2 * spatial, spatial, spatial]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=4 * size.hidden,
            num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
            max_position_embeddings=4096, rope_scaling={"type": "mrope", "mrope_section": mrope_section},
            rope_theta=10000.0, bos_token_id=ids[PAD_TOKEN], eos_token_id=ids[IM_END], pad_token_id=ids[PAD_TOKEN],
        ),
        vision_config=dict(
            depth=size.vision_layers, hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
            num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            # window attention needs window_size >= patch * merge; the last block is full attention.
            window_size=112, fullatt_block_indexes=[size.vision_layers - 1], out_hidden_size=size.hidden,
        ),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )


def build_toy_model(size: ToySize | None = None, seed: int = 0) -> tuple[RFTModel, PreTrainedTokenizerFast, ImageConfig]:
    """The embedded default: a randomly initialised tiny Qwen2.5-VL with the geometry prior on."""
    size = size or ToySize()
    tokenizer = build_toy_tokenizer()
    torch.manual_seed(seed)
    lm = Qwen2_5_VLForConditionalGeneration(toy_config(tokenizer, size))
    use_chat_eos(lm, tokenizer)
    return RFTModel(lm, geometry_dim=size.geometry_dim, zero_init=False), tokenizer, ImageConfig()


# =====================================================================================
# Checkpoint files: every problem is one line naming the file ("Nothing lost, nothing silent")
# =====================================================================================

WEIGHTS_FILE = "model.safetensors"  # one file of weights...
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # ...or shards, listed here (the hub's 3B: 2)
TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer; the only tokenizer file that is required


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line (library messages often span several).

    Example: one_line(ValueError("bad\\n  header")) -> "bad header".
    """
    return " ".join(str(error).split())[:400] or type(error).__name__


def read_json_object(file: str) -> dict:
    """The JSON object in `file`; a missing file, bad JSON or a non-object is one line naming it.

    Example: a config.json holding `[1, 2]` -> ValueError("<dir>/config.json: expected a JSON
    object, got list").
    """
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is missing")
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({one_line(e)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def safetensors_keys(file: str) -> list[str]:
    """The tensor names of a safetensors file, from its header alone (nothing is read into memory).

    Opening checks the header and that the data covers what the header promises, so a truncated,
    empty or random-bytes file fails here, as one line naming it, instead of deep in a load.
    """
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is missing")
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt "
                         f"({one_line(e)})") from None


def weight_files(path: str) -> list[str]:
    """The checkpoint's weight files, each one present and readable, checked against the index.

    A sharded checkpoint (the hub's Qwen2.5-VL-3B: two shards) lists each tensor's shard in
    model.safetensors.index.json; a small one has a single model.safetensors.
    """
    index_file = os.path.join(path, WEIGHTS_INDEX_FILE)
    if not os.path.exists(index_file):
        single = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(single):
            # pickled weights (pytorch_model.bin) are not read: unpickling can run arbitrary code
            other = " (pytorch_model*.bin weights are not read)" if any(
                n.startswith("pytorch_model") for n in os.listdir(path)) else ""
            raise FileNotFoundError(f"{single} is missing (and there is no {WEIGHTS_INDEX_FILE}): "
                                    f"no model weights{other}")
        safetensors_keys(single)
        return [single]
    weight_map = read_json_object(index_file).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(v, str) for v in weight_map.values())):
        raise ValueError(f"{index_file}: 'weight_map' must map tensor names to shard file names")
    files = []
    for shard in sorted(set(weight_map.values())):
        file = os.path.join(path, shard)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} is missing (listed in {WEIGHTS_INDEX_FILE})")
        # A shard that lacks a tensor the index promises would leave that weight random.
        absent = sorted({k for k, v in weight_map.items() if v == shard} - set(safetensors_keys(file)))
        if absent:
            raise ValueError(f"{file}: lacks {len(absent)} tensor(s) that {WEIGHTS_INDEX_FILE} lists, "
                             f"e.g. {absent[0]}")
        files.append(file)
    return files


def describe_key(entry) -> str:
    """One entry of transformers' loading info: a tensor name, or (name, shape in file, shape wanted).

    Example: ("model.x.weight", (128, 512), (128, 1024)) -> "model.x.weight: [128, 512] in the
    file, [128, 1024] wanted".
    """
    if isinstance(entry, str):
        return entry
    return f"{entry[0]}: {list(entry[1])} in the file, {list(entry[2])} wanted"


def load_hf_model(path: str, dtype: torch.dtype) -> Qwen2_5_VLForConditionalGeneration:
    """The Hugging Face model of a folder: every file checked first, every weight accounted for.

    Both layouts load: the hub's (flat config.json, keys `model.*` / `visual.*`, `lm_head`
    absent when tied) and transformers 5's own (`text_config`, `model.language_model.*`).
    transformers would give any weight the files lack a fresh random value with only a log
    line, and drop any tensor the model has no place for (a VG LLM checkpoint's VGGT and merger,
    say): both are errors here, naming the folder.
    """
    config_file = os.path.join(path, "config.json")
    model_type = read_json_object(config_file).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{config_file}: model_type is {model_type!r}, not 'qwen2_5_vl' "
                         "(a Qwen2.5-VL checkpoint)")
    weights = ", ".join(os.path.basename(f) for f in weight_files(path))
    try:  # transformers 5 checks every field's type (hidden_size "big" or 64.0 is refused)
        config = Qwen2_5_VLConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{config_file}: {one_line(e)}") from None
    # transformers logs a multi-line "LOAD REPORT" table for any missing, unexpected or mis-shaped
    # weight; the same facts come back in `info` and are turned into one line below instead.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        lm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, config=config, local_files_only=True, dtype=dtype, output_loading_info=True,
            ignore_mismatched_sizes=True)  # reported in `info` (then refused here), not raised
    except Exception as e:
        raise ValueError(f"{path}: the weights do not load into the model config.json describes "
                         f"({one_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = [f"{len(info[kind])} {kind[:-5]} tensor(s), e.g. {describe_key(sorted(info[kind])[0])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise ValueError(f"{path}: {weights} and config.json do not match: {'; '.join(problems)}")
    return lm


def load_tokenizer(path: str, vocab_rows: int) -> PreTrainedTokenizerFast:
    """The checkpoint's fast tokenizer; a missing or broken one is one line naming the file.

    `vocab_rows` is the model's embedding size: a token id past it would fail inside the model.
    """
    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is missing: the checkpoint has no (fast) tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        read_json_object(os.path.join(path, "tokenizer_config.json"))
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"{file}: the tokenizer does not load ({one_line(e)})") from None
    if tokenizer.convert_tokens_to_ids(IM_END) in (None, tokenizer.unk_token_id):
        raise ValueError(f"{file}: no {IM_END} token: not a Qwen2.5-style chat tokenizer")
    if len(tokenizer) > vocab_rows:
        raise ValueError(f"{file}: {len(tokenizer)} tokens but the model has only {vocab_rows} embedding rows")
    return tokenizer


def load_tensors_into(module: nn.Module, file: str) -> None:
    """Copy a safetensors file into `module`: every tensor, names and shapes must match exactly."""
    safetensors_keys(file)
    try:
        module.load_state_dict(load_file(file))
    except RuntimeError as e:  # load_state_dict lists missing / unexpected / mis-shaped tensors
        raise ValueError(f"{file}: does not fit the model ({one_line(e)})") from None


# =====================================================================================
# Loading and saving
# =====================================================================================


def load_model(
    name_or_dir: str,
    geometry: bool | None = None,
    geometry_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[RFTModel, PreTrainedTokenizerFast, ImageConfig]:
    """Return (model, tokenizer, image_config) for "toy" or a local checkpoint directory.

    `geometry` switches the prior: None keeps what the checkpoint has (on for "toy"); False drops
    it; True on a checkpoint without a merger (or with one of another size) adds a fresh
    zero-initialised one, whose input size `geometry_dim` (features per patch, e.g. 2048 for
    VGGT, 3 for 3D points) must then be given; "toy" with True and a geometry_dim builds its
    (default-initialised) merger for that size. `geometry_from_flags` turns --geometry and
    --geometry-dim into these two. The returned image_config's `geometry_dim` is the model's, so
    that data.collate / data.check_lengths ask each record for the prior it needs. `seed` sets the
    toy model's initial weights. `dtype` is that of every weight, the geometry merger included
    (bfloat16 halves a real model's memory); LoRA adapters stay float32. A folder written with LoRA adapters comes
    back with them (frozen base, trainable adapters; `merge_lora` folds them in). Nothing is
    ever downloaded (`local_files_only=True`). Every file is checked before use: a problem is a
    FileNotFoundError or ValueError of one line that names the file.
    Example: load_model("runs/sft/latest", dtype=torch.bfloat16) -> (RFTModel, tokenizer, ImageConfig).
    """
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a model of a few MB
    if name_or_dir == "toy":
        if geometry_dim is not None and (isinstance(geometry_dim, bool) or not isinstance(geometry_dim, int)
                                         or geometry_dim < 1):
            raise ValueError(f"geometry_dim must be a positive integer, got {geometry_dim!r}")
        # The merger is built last, so the LLM and ViT weights are those of every toy of this seed.
        size = ToySize(geometry_dim=geometry_dim) if geometry and geometry_dim else None
        model, tokenizer, image_config = build_toy_model(size, seed=seed)
        if geometry is False:
            model = RFTModel(model.lm, geometry_dim=0)
        image_config.geometry_dim = model.geometry_dim
        return model.to(dtype), tokenizer, image_config
    if not os.path.isdir(name_or_dir):
        raise FileNotFoundError(f"model directory not found: {name_or_dir!r} "
                                "(use 'toy' or a local checkpoint folder)")
    if not os.path.exists(os.path.join(name_or_dir, "config.json")):
        raise FileNotFoundError(f"{name_or_dir!r} has no config.json: not a Hugging Face checkpoint folder")
    lm = load_hf_model(name_or_dir, dtype)
    tokenizer = load_tokenizer(name_or_dir, lm.config.text_config.vocab_size)
    use_chat_eos(lm, tokenizer)
    extra_file = os.path.join(name_or_dir, RFT_CONFIG_FILE)
    extra = read_json_object(extra_file) if os.path.exists(extra_file) else {}
    saved_dim = extra.get("geometry_dim", 0)
    if isinstance(saved_dim, bool) or not isinstance(saved_dim, int) or saved_dim < 0:
        raise ValueError(f"{extra_file}: geometry_dim must be a non-negative integer, got {saved_dim!r}")
    if geometry is None or (geometry and saved_dim and geometry_dim in (None, saved_dim)):
        dim = saved_dim
    elif not geometry:
        dim = 0
    elif geometry_dim is None:
        raise ValueError(f"{name_or_dir!r} has no geometry merger: give geometry_dim (features per patch, "
                         f"--geometry-dim: e.g. 2048 for VGGT-1B features, 3 or 4 for 3D points from depth)")
    elif isinstance(geometry_dim, bool) or not isinstance(geometry_dim, int) or geometry_dim < 1:
        raise ValueError(f"geometry_dim must be a positive integer, got {geometry_dim!r}")
    else:
        dim = geometry_dim
    model = RFTModel(lm, geometry_dim=dim)
    if dim > 0 and dim == saved_dim:
        merger_file = os.path.join(name_or_dir, GEOMETRY_FILE)
        if not os.path.exists(merger_file):
            raise FileNotFoundError(f"{merger_file} is missing although {RFT_CONFIG_FILE} says "
                                    f"geometry_dim={saved_dim}")
        load_tensors_into(model.geometry_merger, merger_file)
    # The loaded tensors can be views at arbitrary offsets of the file's buffer; fresh copies are
    # 64-byte aligned like those of a model built in memory, so that the vectorised kernels (and
    # with them the last bits of every result) do not depend on where a tensor sat in the file:
    # a resumed run then repeats the uninterrupted one exactly.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    model = model.to(dtype)
    if os.path.exists(os.path.join(name_or_dir, ADAPTER_CONFIG_FILE)):
        # After the cast: adapters stay float32 (LoRALinear). The saved reference merger belongs
        # to the saved merger; a fresh or dropped merger has none.
        load_adapters(model, name_or_dir, with_reference=dim > 0 and dim == saved_dim)
    image_config = image_config_from_dir(name_or_dir, lm.config)
    if "image_config" in extra:
        try:
            image_config = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in extra["image_config"].items()})
        except (AttributeError, TypeError) as e:
            raise ValueError(f"{extra_file}: bad image_config ({one_line(e)})") from None
    image_config.geometry_dim = model.geometry_dim  # what the data code must give the model
    return model, tokenizer, image_config


def use_chat_eos(lm: Qwen2_5_VLForConditionalGeneration, tokenizer: PreTrainedTokenizerFast) -> None:
    """One end-of-answer token everywhere: <|im_end|>, which closes an assistant turn.

    SFT targets end with it, `generate` stops on it and GRPO's completion mask ends at it. A
    checkpoint's own generation_config.json (e.g. a repetition penalty, several EOS ids) is
    replaced by plain settings: sampling must follow exactly the distribution that training scores.
    """
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    if eos is None or eos == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IM_END} token: not a Qwen2.5-style chat checkpoint")
    tokenizer.eos_token = IM_END
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    lm.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)


def save_model(model: RFTModel, tokenizer: PreTrainedTokenizerFast, image_config: ImageConfig, out_dir: str) -> None:
    """Write a checkpoint folder that `load_model(out_dir)` reads back exactly.

    Hugging Face format (config.json + model.safetensors) for the language/vision model, so the
    folder also opens with plain transformers; the geometry merger in its own safetensors file.
    Tensors keep the model's dtype (a bf16 model writes bf16 files, config.json says so). With
    LoRA adapters, model.safetensors holds the *base* weights under their usual names (the
    folder stays a plain checkpoint of the base model) and the adapters go to
    adapter_model.safetensors + adapter_config.json, which `load_model` puts back on top.
    """
    os.makedirs(out_dir, exist_ok=True)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on every checkpoint
    base = None
    if has_lora(model):  # leave the adapter tensors out of the Hugging Face weights
        base = {k: v for k, v in model.lm.state_dict().items() if not k.endswith(LORA_SUFFIXES)}
    model.lm.save_pretrained(out_dir, safe_serialization=True, state_dict=base)
    tokenizer.save_pretrained(out_dir)
    if model.geometry_dim > 0:
        save_file({k: v.contiguous() for k, v in model.geometry_merger.state_dict().items()},
                  os.path.join(out_dir, GEOMETRY_FILE))
    save_adapters(model, out_dir)
    with open(os.path.join(out_dir, RFT_CONFIG_FILE), "w") as f:
        # The pixel settings only: the model's geometry_dim is saved once, above the image config.
        pixels = {k: v for k, v in asdict(image_config).items() if k != "geometry_dim"}
        json.dump({"geometry_dim": model.geometry_dim, "image_config": pixels}, f, indent=1)


def special_token_ids(tokenizer: PreTrainedTokenizerFast, vocab_size: int | None = None) -> list[int]:
    """Ids a completion must never contain: all special tokens except EOS, and padding rows.

    A randomly initialised or young policy samples them otherwise; `generate` suppresses them and
    the training log-probs mask the same logits, so sampling and scoring use one distribution.
    `vocab_size` (the model's output size) adds the ids past the tokenizer's vocabulary: a real
    Qwen2.5-VL has 151,936 output rows for a tokenizer of 151,665 tokens.
    """
    eos = tokenizer.eos_token_id
    ids = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))
    unk = tokenizer.unk_token_id
    if unk is not None:
        ids.add(unk)
    if vocab_size is not None:
        ids |= set(range(len(tokenizer), vocab_size))
    return sorted(i for i in ids if i is not None and i != eos and i >= 0)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (for logs and the README)."""
    return sum(p.numel() for p in model.parameters())


# =====================================================================================
# Memory: gradient checkpointing and a frozen low-precision reference
# =====================================================================================


def cache_layer_state(cache, index: int) -> dict | None:
    """The attributes of the KV cache's entry for one layer (its keys and values), before the layer writes.

    Hugging Face's DynamicLayer grows by reassignment (`keys = cat(keys, new)`), so a shallow
    copy of its attributes is the whole state: the tensors themselves are not copied.
    """
    if cache is None or index >= len(cache.layers):
        return None
    return dict(vars(cache.layers[index]))


def checkpointed_layer_forward(layer: nn.Module, forward, hidden_states: torch.Tensor, *args, **kwargs):
    """One decoder layer under non-reentrant activation checkpointing, KV cache included.

    Whenever autograd records (train or eval mode alike: a checkpoint loads in eval mode), the
    layer keeps only its input; the backward pass runs it again to get the activations it needs.
    A layer that writes the KV cache (the prompt pass of `_score_continuations`) would write a
    second time on that rerun, so the cache entry is put back as it was before the layer ran at
    the start of both runs: the rerun then sees the same keys and values and computes the same
    numbers. Without gradients (sampling, the reference pass, evaluation) the layer runs as usual.
    """
    cache = kwargs.get("cache")
    index = layer.self_attn.layer_idx
    before = cache_layer_state(cache, index)
    if not torch.is_grad_enabled() or (cache is not None and before is None):
        return forward(hidden_states, *args, **kwargs)

    def run(h: torch.Tensor) -> torch.Tensor:
        if before is not None:
            vars(cache.layers[index]).update(before)  # the cache entry as it was before this layer
        return forward(h, *args, **kwargs)

    return checkpoint(run, hidden_states, use_reentrant=False)


def enable_gradient_checkpointing(net: RFTModel) -> RFTModel:
    """Recompute each LLM decoder layer's activations in the backward pass instead of storing them.

    Activation memory per layer drops from everything the layer computes (attention, the 11,008-wide
    MLP of Qwen2.5-VL-3B, ...) to its input, at the cost of one more forward pass per step. Only
    the LLM's layers: the ViT is frozen (the paper) and keeps no activations for a backward (the
    toy ViT that toy SFT trains is small).
    Non-reentrant checkpointing gives gradients to the parameters inside a layer even when the
    layer's input needs none (LoRA on frozen embeddings, or `inputs_embeds`), so no
    `enable_input_require_grads` is needed. This is not transformers' `gradient_checkpointing_enable`:
    that one turns the KV cache off inside checkpointed layers, which GRPO's one-prompt-pass
    scoring relies on (`checkpointed_layer_forward` keeps it). Gradients are unchanged (bit for bit
    on the CPU, tested).
    Returns `net`; calling it twice changes nothing.
    """
    for layer in net.lm.model.language_model.layers:
        if not getattr(layer, "rft_checkpointed", False):
            # An instance attribute shadows the class's forward: nn.Module.__call__ then runs this.
            layer.forward = functools.partial(checkpointed_layer_forward, layer, layer.forward)
            layer.rft_checkpointed = True
    return net


def load_reference(name_or_dir: str, dtype: torch.dtype = torch.bfloat16, geometry: bool | None = None,
                   geometry_dim: int | None = None, seed: int = 0) -> RFTModel:
    """GRPO's frozen reference policy: loaded in `dtype`, adapters merged, eval mode, no gradients.

    Full fine-tuning keeps this second model for the KL term (with LoRA, `adapters_disabled`
    gives the reference from the policy's own weights and nothing is loaded). It only runs
    forward passes, so bfloat16 halves its memory (2 bytes per weight, ~7.5 GB for the 3B
    model); its log-probs then differ from a float32 policy's by rounding, so the KL is not
    exactly 0 at step 0. Example: ref = load_reference("runs/sft/latest").to(device).
    """
    net = load_model(name_or_dir, geometry=geometry, geometry_dim=geometry_dim, dtype=dtype, seed=seed)[0]
    if has_lora(net):
        merge_lora(net)  # a frozen model gains nothing from separate adapters
    net.eval().requires_grad_(False)
    return net


# =====================================================================================
# LoRA, by hand (Hu et al. 2021): a trainable low-rank update beside each frozen linear layer
# =====================================================================================

# The LLM projections that get adapters: Qwen2's attention and MLP. The ViT's blocks reuse some
# names (gate_proj, ...) but are never touched: add_lora only walks the LLM's decoder layers.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SUFFIXES = (".lora_A", ".lora_B")  # state-dict names of the adapter tensors
ADAPTER_FILE = "adapter_model.safetensors"  # adapters (+ the reference merger), names as in net.lm
ADAPTER_CONFIG_FILE = "adapter_config.json"  # r, lora_alpha, lora_dropout, target_modules


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update: y = W x + b + (alpha / r) * B A dropout(x).

    A (r x in) starts Kaiming-uniform, as nn.Linear's own weights do, and B (out x r) at zero, so
    B A = 0 and the wrapped layer first computes exactly the base layer. W and b are the base
    layer's own Parameter objects, not copies: the base weights exist once, with the adapters on,
    off (`adapters_disabled`) or merged. alpha / r keeps the update's size independent of r.
    A and B are float32 whatever the base dtype (peft's default too): an AdamW step on bf16
    weights rounds away any update below ~0.4% of the weight, and the adapters are tiny; the
    low-rank branch runs in float32 and is cast to the layer's output dtype. Example: q_proj of width 2048 with r = 8 adds 8 * (2048 + 2048) = 32,768 trainable numbers
    beside its 4.2 M frozen ones.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared with the base layer, not copied
        self.rank, self.alpha, self.scale, self.dropout_p = rank, alpha, alpha / rank, dropout
        # A is drawn on the CPU from its own generator: the same adapters on any device, and the
        # global random stream (data order, sampling) is the same with or without LoRA.
        a = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adapters_enabled = True  # False inside `adapters_disabled`: exactly the base layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # the base layer, computed as nn.Linear does
        if not self.adapters_enabled:
            return out
        update = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (self.scale * update).to(out.dtype)  # B = 0 adds exact zeros

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha}"


def has_lora(net: nn.Module) -> bool:
    """Whether the model carries LoRA adapters."""
    return any(isinstance(m, LoRALinear) for m in net.modules())


def lora_parameters(net: nn.Module) -> list[nn.Parameter]:
    """What a LoRA run trains, in module order: the adapters and the geometry merger; all else frozen.

    `add_lora` ends with it; a run resumed from a LoRA checkpoint calls it on the loaded model in
    place of `runtime.trainable_parameters` (which would unfreeze the base). Works on a
    DDP-wrapped model too. Example: the toy model -> 28 adapter tensors (2 layers x 7 targets x
    A, B) + 5 geometry merger tensors.
    """
    trainable = []
    for name, p in net.named_parameters():
        p.requires_grad = name.endswith(LORA_SUFFIXES) or ".geometry_merger." in f".{name}"
        if p.requires_grad:
            trainable.append(p)
    return trainable


def add_lora(net: RFTModel, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] = LORA_TARGETS, seed: int = 0) -> list[nn.Parameter]:
    """Wrap the `targets` linears of the LLM's decoder layers in LoRALinear; return the trainable parameters.

    Every base weight is frozen (embeddings, norms, LM head, ViT). The geometry merger, if present,
    stays trainable in full: it is small and, added to a checkpoint that has none, starts at zero,
    where a low-rank update could not grow it. A frozen copy of it as it is now
    (`net.reference_merger`) stands in for it under `adapters_disabled`, so that the base model
    seen there is exactly the starting policy. `seed` draws the A matrices. Example:
    params = add_lora(net, rank=8, alpha=16); torch.optim.AdamW(params, lr=1e-4).
    """
    if has_lora(net):
        raise ValueError("the model already has LoRA adapters: merge_lora(net) first to start new ones")
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 "
                         f"(got {rank}, {alpha}, {dropout})")
    generator = torch.Generator().manual_seed(seed)
    wrapped = set()
    for layer in net.lm.model.language_model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha, dropout, generator))
                    wrapped.add(name)
    if set(targets) - wrapped:
        raise ValueError(f"no linear layer named {sorted(set(targets) - wrapped)} in the LLM's decoder layers "
                         f"(LoRA targets: {', '.join(LORA_TARGETS)})")
    if net.geometry_dim > 0:
        net.reference_merger = copy.deepcopy(net.geometry_merger).requires_grad_(False)
    return lora_parameters(net)


@contextmanager
def adapters_disabled(net: nn.Module):
    """Inside the block the model computes exactly its base model: the KL reference of a LoRA run.

    Every LoRA branch is skipped (the frozen W x + b alone) and the geometry merger's frozen
    starting copy replaces the trained one, so the output is bit for bit that of the model
    before training, from the same weights: no second copy of the model. Works on a DDP-wrapped
    model too; a model without adapters is an error (it would silently give the policy itself).
    Example: with torch.no_grad(), adapters_disabled(net): ref_logits = net(**batch)
    """
    switches = [m for m in net.modules() if hasattr(m, "adapters_enabled")]
    if not any(isinstance(m, LoRALinear) for m in switches):
        raise ValueError("adapters_disabled: the model has no LoRA adapters, so no base model to switch to")
    saved = [m.adapters_enabled for m in switches]
    for m in switches:
        m.adapters_enabled = False
    try:
        yield net
    finally:
        for m, state in zip(switches, saved):
            m.adapters_enabled = state


def plain_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An nn.Linear around existing Parameters, allocating nothing (built on the meta device first)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight, layer.bias = weight, bias
    return layer


def merge_lora(net: RFTModel) -> RFTModel:
    """Fold each adapter into its base weight, W <- W + (alpha / r) B A, and drop the wrappers.

    The result is a plain Qwen2.5-VL again, with the module names and state-dict keys it had
    before `add_lora`, computing what the adapted model computed (up to rounding): for
    evaluation, export, or to start a new LoRA stage (GRPO after a LoRA SFT) from this policy.
    B A is formed in float32 and added with one rounding to W's dtype. The reference merger
    goes too: a merged model is its own base. The weights stay frozen (add_lora froze them):
    `add_lora` again, or `runtime.trainable_parameters` for full fine-tuning. Returns `net`.
    """
    with torch.no_grad():
        for parent in list(net.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    delta = child.scale * (child.lora_B.float() @ child.lora_A.float())
                    child.weight.copy_(child.weight.float() + delta)
                    setattr(parent, name, plain_linear(child.weight, child.bias))
    if "reference_merger" in net._modules:
        del net.reference_merger
    return net


def lora_state_dict(net: RFTModel) -> dict[str, torch.Tensor]:
    """The tensors a LoRA checkpoint adds: adapters named as in `net.lm` (e.g.
    "model.language_model.layers.0.self_attn.q_proj.lora_A"), and the reference merger under
    "reference_merger." (what `adapters_disabled` needs to give the starting policy again)."""
    state = {k: v for k, v in net.lm.state_dict().items() if k.endswith(LORA_SUFFIXES)}
    if "reference_merger" in net._modules:
        state.update({f"reference_merger.{k}": v for k, v in net.reference_merger.state_dict().items()})
    return state


def save_adapters(net: RFTModel, out_dir: str) -> None:
    """adapter_model.safetensors + adapter_config.json for a model with adapters; none otherwise.

    The names follow peft's vocabulary (r, lora_alpha, ...) but the files are this project's own
    format, read by `load_adapters`. Stale adapter files of an earlier save are removed: they
    would be put back on a model that has none.
    """
    files = [os.path.join(out_dir, ADAPTER_FILE), os.path.join(out_dir, ADAPTER_CONFIG_FILE)]
    lora = [m for m in net.modules() if isinstance(m, LoRALinear)]
    if not lora:
        for file in files:
            if os.path.exists(file):
                os.remove(file)
        return
    save_file({k: v.contiguous() for k, v in lora_state_dict(net).items()}, files[0])
    names = {name.rsplit(".", 1)[-1] for name, m in net.lm.named_modules() if isinstance(m, LoRALinear)}
    config = {"r": lora[0].rank, "lora_alpha": lora[0].alpha, "lora_dropout": lora[0].dropout_p,
              "target_modules": [t for t in LORA_TARGETS if t in names] + sorted(names - set(LORA_TARGETS)),
              "layers": "LLM decoder layers only (model.language_model.layers)"}
    with open(files[1], "w") as f:
        json.dump(config, f, indent=1)


def load_adapters(net: RFTModel, path: str, with_reference: bool) -> None:
    """Put the adapters of a checkpoint folder back on `net` (add_lora, then the saved tensors).

    `with_reference`: the saved reference merger applies (the merger itself came from the same
    folder); otherwise the fresh snapshot `add_lora` takes stays. Every tensor is checked.
    """
    config_file = os.path.join(path, ADAPTER_CONFIG_FILE)
    config = read_json_object(config_file)
    rank, alpha, dropout, targets = (config.get(k) for k in ("r", "lora_alpha", "lora_dropout",
                                                             "target_modules"))
    if not (isinstance(rank, int) and isinstance(alpha, (int, float)) and isinstance(dropout, (int, float))
            and isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"{config_file}: needs integer r, numbers lora_alpha and lora_dropout, "
                         f"a list of target_modules names (got {rank!r}, {alpha!r}, {dropout!r}, {targets!r})")
    try:
        add_lora(net, rank, alpha, dropout, tuple(targets))
    except ValueError as e:
        raise ValueError(f"{config_file}: {one_line(e)}") from None
    file = os.path.join(path, ADAPTER_FILE)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing although {ADAPTER_CONFIG_FILE} is present")
    safetensors_keys(file)
    saved = {k: v for k, v in load_file(file).items()
             if with_reference or not k.startswith("reference_merger.")}
    expected = lora_state_dict(net)
    if not with_reference:
        expected = {k: v for k, v in expected.items() if not k.startswith("reference_merger.")}
    odd = sorted(set(expected) ^ set(saved))  # missing or extra
    odd += sorted(k for k in saved if k in expected and saved[k].shape != expected[k].shape)
    if odd:
        raise ValueError(f"{file}: does not fit the model's adapters ({len(odd)} tensor(s) missing, extra or "
                         f"of another shape, e.g. {odd[0]})")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(saved[key])  # state_dict tensors share storage with the parameters
