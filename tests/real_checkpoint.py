"""A tiny checkpoint of the real class, written in the hub's layout (a fixture builder for the tests).

Nothing is downloaded. `make_hub_checkpoint(path)` writes into `path` a randomly initialised
`Qwen2_5_VLForConditionalGeneration` whose configuration is Qwen2.5-VL-3B-Instruct's shrunk in
depth and width, saved file for file as the hub serves that model:

    config.json                        flat: text fields at top level, `vision_config` nested
    model-00001-of-00002.safetensors   keys `model.*` (LLM) and `visual.*` (ViT); no `lm_head`,
    model-00002-of-00002.safetensors   as the embeddings are tied (`tie_word_embeddings: true`)
    model.safetensors.index.json       which shard holds which key
    tokenizer.json, tokenizer_config.json, vocab.json, merges.txt
                                       a byte-level BPE padded so that Qwen's special tokens sit
                                       on their real ids (151643 <|endoftext|> ... 151664)
    preprocessor_config.json           the real image processor settings
    generation_config.json             sampling defaults in the hub's form (load_model replaces them)

What a loader reads is real: file names, key names, config fields, special-token ids, 151,936
output rows, vision patch 14 / merge 2 / temporal patch 2. Depth and width are shrunk, the
weights random and the BPE merges learned from a few sentences, so the model answers gibberish.

Example:
    path = make_hub_checkpoint(tmp_path / "qwen", layers=2, hidden=128)
    net, tokenizer, image_cfg = model.load_model(str(path))
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

# =====================================================================================
# The real numbers (Qwen2.5-VL-3B-Instruct's config.json, tokenizer and preprocessor)
# =====================================================================================

VOCAB_ROWS = 151936  # output rows of the LM head (and rows of the tied embedding)
FIRST_SPECIAL_ID = 151643  # the BPE vocabulary fills ids 0..151642; the added tokens follow

# Qwen2.5's added tokens in id order from 151643, with the tokenizer's `special` flag: the chat and
# vision markers are special, the tool-call and fill-in-the-middle markers are ordinary added tokens.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
REAL_IDS = {token: FIRST_SPECIAL_ID + i for i, (token, _) in enumerate(ADDED_TOKENS)}  # 151643..151664

# Qwen2's pre-tokenizer: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces (the same regex as its tokenizer.json).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# preprocessor_config.json of Qwen2.5-VL-3B-Instruct, as served
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# generation_config.json in the form of Qwen2.5-VL-3B-Instruct's: two EOS ids and a repetition penalty,
# i.e. what model.use_chat_eos must replace by plain settings (values as published, from memory)
GENERATION_CONFIG = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
    "transformers_version": "4.49.0",
}

# Text the toy BPE learns its merges from: the project's prompt wording is enough to make words whole.
BPE_CORPUS = [
    "You are a helpful assistant.",
    "Detect the 3D bounding boxes in the camera coordinate system of the first frame.",
    'Output a json list where each entry contains the object name in "label" and its 3D bounding box',
    "Localize the first clear frame in the video showing the object described in the text.",
    "These are frames of a video. How many chairs are in this room? Answer with the option's letter.",
    '<think></think><answer>[{"label":"chair","bbox_3d":'
    '[1.23,-0.45,2.00,0.50,0.80,0.50,0.00,0.30,0.10]}]</answer>',
]


# =====================================================================================
# config.json
# =====================================================================================


def hub_config(layers: int = 2, hidden: int = 256, heads: int | None = None, kv_heads: int = 1,
               vision_layers: int = 2, vision_hidden: int = 64) -> dict:
    """Qwen2.5-VL-3B-Instruct's flat config.json, shrunk: `layers` x `hidden` LLM, small ViT.

    The real model: 36 layers of width 2048, 16 heads of 128 (2 key/value heads), ViT 32 x 1280
    with full attention in blocks 7, 15, 23, 31. Here heads stay 128 wide when `hidden` allows (so
    mrope_section keeps the real 16/24/24 split of head_dim / 2 = 64), the ViT keeps patch 14,
    merge 2, temporal patch 2 and window 112 (>= patch * merge), and its last block is the full-
    attention one. Example: hub_config(2, 256)["num_attention_heads"] == 2 (head_dim 128).
    """
    heads = heads or max(1, hidden // 128)
    head_dim = hidden // heads
    half = head_dim // 2
    spatial = (half - half // 4) // 2  # Qwen's 1/4 : 3/8 : 3/8 split of (time, height, width)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": REAL_IDS["<|endoftext|>"],
        "eos_token_id": REAL_IDS["<|im_end|>"],
        "vision_start_token_id": REAL_IDS["<|vision_start|>"],
        "vision_end_token_id": REAL_IDS["<|vision_end|>"],
        "vision_token_id": REAL_IDS["<|vision_pad|>"],
        "image_token_id": REAL_IDS["<|image_pad|>"],
        "video_token_id": REAL_IDS["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision_layers,
            "hidden_act": "silu",
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [vision_layers - 1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [half - 2 * spatial, spatial, spatial]},
        "vocab_size": VOCAB_ROWS,
    }


# =====================================================================================
# Weights: random, renamed to the hub's keys, sharded
# =====================================================================================


def hub_key(name: str) -> str:
    """A transformers-5 parameter name -> the hub's (what transformers' loader maps back on load).

    Example: "model.language_model.norm.weight" -> "model.norm.weight"; "model.visual.x" -> "visual.x".
    """
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def write_shards(lm: Qwen2_5_VLForConditionalGeneration, path: str, shards: int) -> None:
    """bf16 tensors under hub keys in `shards` files plus `model.safetensors.index.json`.

    The hub's 3B checkpoint stores bf16 and no `lm_head.weight` (tied to the embedding, which
    transformers re-ties on load). Keys are split over the shards in sorted order, as the hub's
    two shards are: model-00001-of-00002.safetensors, model-00002-of-00002.safetensors.
    """
    state = {hub_key(k): v.to(torch.bfloat16).contiguous() for k, v in lm.state_dict().items()
             if k != "lm_head.weight"}
    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
    for name in names:
        save_file({k: state[k] for k in keys if weight_map[k] == name}, os.path.join(path, name),
                  metadata={"format": "pt"})  # the hub's files carry this metadata
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json(os.path.join(path, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": weight_map})


# =====================================================================================
# The tokenizer: a byte-level BPE padded to Qwen's ids
# =====================================================================================


def qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    """Qwen2's text pipeline around a BPE model: NFC, its split regex, then bytes as characters.

    Byte-level: every UTF-8 byte is one of 256 base symbols, so any text encodes and decodes back.
    """
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def write_tokenizer(path: str) -> None:
    """tokenizer.json (+ config, vocab.json, merges.txt) whose added tokens land on Qwen's real ids.

    A byte-level BPE is trained on BPE_CORPUS (a few hundred tokens), then its vocabulary is
    padded with never-produced filler entries up to id 151642, so that <|endoftext|> is 151643 and
    <|video_pad|> 151656, as in Qwen2.5. The model has 151,936 output rows: ids 151665.. are rows
    without a token, as in the real checkpoint.
    """
    trained = qwen2_pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    trained.train_from_iterator(BPE_CORPUS, trainer)
    learned = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    vocab = dict(learned["vocab"])
    # Filler entries: reachable by no merge, so never produced; they only move the ids up.
    for i in range(FIRST_SPECIAL_ID - len(vocab)):
        vocab[f"<filler_{i}>"] = len(vocab)
    tok = qwen2_pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges)))
    for token, special in ADDED_TOKENS:  # one at a time, in order: the ids follow the list
        added = AddedToken(token, special=special, normalized=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
    assert tok.token_to_id("<|video_pad|>") == 151656 and tok.get_vocab_size() == 151665
    tok.save(os.path.join(path, "tokenizer.json"))
    write_json(os.path.join(path, "vocab.json"), vocab)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    decoder = {str(REAL_IDS[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": s} for t, s in ADDED_TOKENS}
    write_json(os.path.join(path, "tokenizer_config.json"), {
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t, s in ADDED_TOKENS[1:] if s],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })


# =====================================================================================
# The whole folder
# =====================================================================================


def write_json(file: str, obj: dict) -> None:
    """Pretty JSON, as the hub's files are."""
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def make_hub_checkpoint(path, layers: int = 2, hidden: int = 256, heads: int | None = None, kv_heads: int = 1,
                        vision_layers: int = 2, vision_hidden: int = 64, shards: int = 2, seed: int = 0) -> str:
    """Write a random shrunk Qwen2.5-VL-3B-Instruct in the hub's file layout to `path`; return `path`.

    The model is built from the same flat config.json it is saved with, through transformers' own
    config class, so what gets saved is what a load must rebuild. Example:
    make_hub_checkpoint("/tmp/qwen", layers=2, hidden=128) -> "/tmp/qwen" (~40 MB of bf16, most of it
    the 151,936 x 128 embedding).
    """
    path = str(path)
    os.makedirs(path, exist_ok=True)
    config_dict = hub_config(layers, hidden, heads, kv_heads, vision_layers, vision_hidden)
    write_json(os.path.join(path, "config.json"), config_dict)
    with torch.random.fork_rng():  # seeded weights, and the caller's random stream left as it was
        torch.manual_seed(seed)
        lm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(path))
    write_shards(lm, path, shards)
    write_tokenizer(path)
    write_json(os.path.join(path, "preprocessor_config.json"), PREPROCESSOR_CONFIG)
    write_json(os.path.join(path, "generation_config.json"), GENERATION_CONFIG)
    return path


# =====================================================================================
# Records to feed it (detection records with random frames, as data.load_records returns them)
# =====================================================================================


def make_records(folder, n: int = 2, frames: int = 2, size: int = 112, geometry_dim: int = 4,
                 seed: int = 0) -> list[dict]:
    """`n` detection records of `frames` random size x size frames and a random geometry prior.

    Written to `folder` and read back through `data.load_records`, so they are real records.
    A 112 x 112 frame is an 8 x 8 patch grid: 16 visual tokens. Example:
    make_records(tmp_path) -> 2 records of 2 frames each.
    """
    import numpy as np
    from PIL import Image

    import data

    folder = str(folder)
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "frames"), exist_ok=True)
    lines = []
    for r in range(n):
        images = []
        for i in range(frames):
            name = f"frames/{r}_{i}.png"
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, name))
            images.append(name)
        grid = size // 14  # the prior lives on the ViT's patch grid
        prior = rng.normal(size=(frames, grid, grid, geometry_dim)).astype(np.float32)
        np.save(os.path.join(folder, f"g{r}.npy"), prior)
        boxes = [{"label": "chair", "bbox_3d": [1, 0, 2 + r, .5, .8, .5, 0, 0, .3]}]
        lines.append(json.dumps({
            "id": f"r{r}", "task": "detection", "images": images, "geometry": f"g{r}.npy", "boxes": boxes,
            "conversations": [{"from": "human", "value": data.detection_prompt(frames)},
                              {"from": "gpt", "value": data.detection_answer(boxes)}]}))
    with open(os.path.join(folder, "detection.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return data.load_records(folder, "detection")
