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
  Qwen2.5-VL image processor needs torchvision, which cannot be installed next to this torch).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
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
# --geometry of sft.py and eval.py: keep the checkpoint's setting, force the prior on, or drop it
GEOMETRY_FLAG = {"auto": None, "on": True, "off": False}


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
        with open(processor_file) as f:
            processor = json.load(f)
        size = processor.get("size") if isinstance(processor.get("size"), dict) else {}
        for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if size.get(size_key):
                setattr(image_config, key, int(size[size_key]))
        for key in ("image_mean", "image_std", "min_pixels", "max_pixels"):
            if processor.get(key) is not None:   # an explicit null means "not set", as in transformers
                value = processor[key]
                setattr(image_config, key, tuple(value) if isinstance(value, list) else value)
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
        self.lm = lm
        self.geometry_dim = geometry_dim  # features per patch; 0 = no geometry prior
        if geometry_dim > 0:
            width = lm.config.text_config.hidden_size
            merge = lm.config.vision_config.spatial_merge_size
            self.geometry_merger = geometry_merger(geometry_dim * merge * merge, width, width, zero_init)

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
                raise ValueError("this model fuses a geometry prior: the batch must carry `geometry`")
            tokens = tokens + self.geometry_merger(geometry.to(tokens.dtype))
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


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained offline, in milliseconds, on TOY_CORPUS and the prompt texts.

    Pre-tokenisation keeps a word together with its leading space (" chair") and every other
    character alone, so digits stay single characters as in Qwen's own tokenizer and every ASCII
    text still encodes. BPE training then merges each word of the corpus into one token. Decoding
    concatenates tokens as they are. Training is deterministic: the same corpus, the same vocabulary.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers


    corpus = [TOY_CORPUS, data.DETECTION_PROMPT, data.GROUNDING_PROMPT, data.SPATIAL_PREFIX,
              data.SPATIAL_NUMERIC_SUFFIX, data.SPATIAL_MC_SUFFIX, data.SYSTEM_PROMPT]
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
    it; True on a checkpoint without a merger adds a fresh zero-initialised one, whose input size
    `geometry_dim` (features per patch, e.g. 2048 for VGGT) must then be given. `seed` sets the
    toy model's initial weights. Nothing is ever downloaded (`local_files_only=True`).
    """
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a model of a few MB
    if name_or_dir == "toy":
        model, tokenizer, image_config = build_toy_model(seed=seed)
        if geometry is False:
            model = RFTModel(model.lm, geometry_dim=0)
        return model.to(dtype), tokenizer, image_config
    if not os.path.isdir(name_or_dir):
        raise FileNotFoundError(f"model directory not found: {name_or_dir!r} (use 'toy' or a local checkpoint folder)")
    if not os.path.exists(os.path.join(name_or_dir, "config.json")):
        raise FileNotFoundError(f"{name_or_dir!r} has no config.json: not a Hugging Face checkpoint folder")
    lm = Qwen2_5_VLForConditionalGeneration.from_pretrained(name_or_dir, local_files_only=True, dtype=dtype)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(name_or_dir, local_files_only=True)
    use_chat_eos(lm, tokenizer)
    extra = {}
    extra_file = os.path.join(name_or_dir, RFT_CONFIG_FILE)
    if os.path.exists(extra_file):
        with open(extra_file) as f:
            extra = json.load(f)
    saved_dim = int(extra.get("geometry_dim", 0))
    if geometry is None or (geometry and saved_dim and geometry_dim in (None, saved_dim)):
        dim = saved_dim
    elif not geometry:
        dim = 0
    elif geometry_dim is None:
        raise ValueError(f"{name_or_dir!r} has no geometry merger: give geometry_dim (features per patch)")
    else:
        dim = geometry_dim
    model = RFTModel(lm, geometry_dim=dim)
    if dim > 0 and dim == saved_dim:
        merger_file = os.path.join(name_or_dir, GEOMETRY_FILE)
        if not os.path.exists(merger_file):
            raise FileNotFoundError(f"{merger_file} is missing although {RFT_CONFIG_FILE} says geometry_dim={saved_dim}")
        model.geometry_merger.load_state_dict(load_file(merger_file))
    # The loaded tensors can be views at arbitrary offsets of the file's buffer; fresh copies are
    # 64-byte aligned like those of a model built in memory, so that the vectorised kernels (and
    # with them the last bits of every result) do not depend on where a tensor sat in the file:
    # a resumed run then repeats the uninterrupted one exactly.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    image_config = image_config_from_dir(name_or_dir, lm.config)
    if "image_config" in extra:
        image_config = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in extra["image_config"].items()})
    return model.to(dtype), tokenizer, image_config


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
    """
    os.makedirs(out_dir, exist_ok=True)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on every checkpoint
    model.lm.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if model.geometry_dim > 0:
        save_file({k: v.contiguous() for k, v in model.geometry_merger.state_dict().items()},
                  os.path.join(out_dir, GEOMETRY_FILE))
    with open(os.path.join(out_dir, RFT_CONFIG_FILE), "w") as f:
        json.dump({"geometry_dim": model.geometry_dim, "image_config": asdict(image_config)}, f, indent=1)


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
