"""Tests of model.py against a checkpoint of the real class in the hub's layout (tests/real_checkpoint.py).

The checkpoint is a randomly initialised Qwen2.5-VL-3B-Instruct shrunk to 2 layers of width 64
(151,936 vocabulary rows, tied embeddings, 2 bf16 shards, the real special-token ids and image
processor settings), built once per module in a few seconds. Then: it loads as the real class;
the banned ids are the real ones; the hand patchify equals transformers' processor on real-size
frames; bf16 forward, generate and LoRA save/load run on the CPU; and every kind of broken
checkpoint is a one-line error naming the file.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

import data
import model
from tests import real_checkpoint as rc

VG_LLM_MAX_PIXELS = 576 * 28 * 28  # VG LLM's per-frame pixel budget (451,584)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The shrunk Qwen2.5-VL-3B-Instruct folder: width 64 keeps it at ~20 MB (the 151,936 x 64 embedding)."""
    return rc.make_hub_checkpoint(tmp_path_factory.mktemp("hub"), layers=2, hidden=64)


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    """The toy model saved by save_model (one model.safetensors, geometry merger), plain and with LoRA."""
    net, tokenizer, cfg = model.load_model("toy")
    plain = str(tmp_path_factory.mktemp("toy"))
    model.save_model(net, tokenizer, cfg, plain)
    model.add_lora(net, rank=2)
    lora = str(tmp_path_factory.mktemp("toy_lora"))
    model.save_model(net, tokenizer, cfg, lora)
    return plain, lora


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return rc.make_records(tmp_path_factory.mktemp("records"), n=2, frames=2)


# ----------------------------------------------------------------------------- the real layout

def test_loads_as_the_real_class_from_the_hub_layout(hub):
    # the fixture really is in the hub's layout, not transformers 5's
    config = json.loads(open(os.path.join(hub, "config.json")).read())
    assert "text_config" not in config and config["hidden_size"] == 64 and "vision_config" in config
    index = json.loads(open(os.path.join(hub, model.WEIGHTS_INDEX_FILE)).read())["weight_map"]
    assert len(set(index.values())) == 2 and "lm_head.weight" not in index  # tied: no LM head stored
    assert all(k.startswith(("model.", "visual.")) for k in index)
    net, tokenizer, cfg = model.load_model(hub)
    lm = net.lm
    assert type(lm) is Qwen2_5_VLForConditionalGeneration and type(lm.config) is Qwen2_5_VLConfig
    assert lm.config.text_config.vocab_size == lm.lm_head.weight.shape[0] == rc.VOCAB_ROWS
    assert lm.lm_head.weight is lm.model.language_model.embed_tokens.weight  # tied, as in the 3B model
    vision = lm.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)
    assert net.geometry_dim == 0 and not model.has_lora(net)
    # every weight is the one in the shards, none left random (bf16 -> fp32 is exact, so back too)
    saved = {}
    for shard in set(index.values()):
        saved.update(load_file(os.path.join(hub, shard)))
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    assert len(state) == len(saved)
    assert all(torch.equal(v.to(torch.bfloat16), saved[rc.hub_key(k)]) for k, v in state.items())


def test_special_ids_are_the_real_ones_and_banned(hub):
    _, tokenizer, _ = model.load_model(hub)
    assert len(tokenizer) == 151665
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in rc.REAL_IDS} == rc.REAL_IDS
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
    banned = set(model.special_token_ids(tokenizer, rc.VOCAB_ROWS))
    assert 151645 not in banned  # <|im_end|> ends every answer
    assert set(range(151643, 151657)) - {151645} <= banned  # the chat and vision markers
    assert set(range(151665, rc.VOCAB_ROWS)) <= banned  # 271 output rows without a token
    # exactly those: ordinary text, and the added tokens Qwen does not mark special
    # (<tool_call>, <|fim_prefix|>, ... 151657-151664), stay sampleable
    assert banned == (set(range(151643, 151657)) - {151645}) | set(range(151665, rc.VOCAB_ROWS))
    text = '<think></think><answer>[{"label":"chair"}]</answer>'  # byte-level BPE: any text round-trips
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("width, height", [(640, 480), (1296, 968)])
@pytest.mark.parametrize("max_pixels", [VG_LLM_MAX_PIXELS, 12845056])
def test_hand_patchify_equals_transformers_processor(width, height, max_pixels):
    """A ScanNet-sized frame at VG LLM's budget (1296 x 968 -> 40 x 54 patches) and at the checkpoint's
    (-> 70 x 92): resize, rescale, normalise and patch order all equal transformers' own processor."""
    rng = np.random.default_rng(width)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    cfg = model.ImageConfig(min_pixels=3136, max_pixels=max_pixels)
    pixel_values, grid = data.images_to_patches([frame], cfg)
    # the PIL backend: the one Qwen2.5-VL image processor that imports without torchvision
    processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=max_pixels, patch_size=14,
                                         merge_size=2, temporal_patch_size=2)
    expected = processor(images=[Image.fromarray(frame)], return_tensors="pt")
    assert torch.equal(grid, expected["image_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values"])  # bit for bit


def test_bf16_forward_generate_and_lora_round_trip(tmp_path, hub, records):
    """The memory settings on the real class, on the CPU: bf16 weights, the 151,936-row LM head, LoRA."""
    net, tokenizer, cfg = model.load_model(hub, dtype=torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    net.eval()
    batch = data.collate(records, tokenizer, cfg)
    with torch.no_grad():  # the last 8 positions: all 151,936 output rows, a fraction of the time
        base_tail = net(**batch, logits_to_keep=8)
    assert base_tail.shape == (2, 8, rc.VOCAB_ROWS) and torch.isfinite(base_tail).all()
    banned = model.special_token_ids(tokenizer, rc.VOCAB_ROWS)
    prompts = data.collate(records, tokenizer, cfg, with_answer=False)
    new = net.generate(prompts, max_new_tokens=4, do_sample=False, suppress_tokens=banned)
    assert new.shape == (2, 4) and not set(new.flatten().tolist()) & set(banned)
    # LoRA on the tied-embedding model, saved in bf16 and loaded back identical
    model.add_lora(net, rank=2, alpha=4)
    with torch.no_grad():  # B != 0: the adapters change the outputs, so the round trip means something
        for name, p in net.named_parameters():
            if name.endswith(".lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    model.save_model(net, tokenizer, cfg, str(tmp_path))
    with safe_open(os.path.join(tmp_path, model.ADAPTER_FILE), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # adapters stay float32
    loaded, _, _ = model.load_model(str(tmp_path), dtype=torch.bfloat16)
    dtypes = {(n.endswith(model.LORA_SUFFIXES), p.dtype) for n, p in loaded.named_parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    loaded.eval()
    with torch.no_grad():
        adapted = loaded(**batch, logits_to_keep=8)
        assert torch.equal(adapted, net(**batch, logits_to_keep=8)) and not torch.equal(adapted, base_tail)
        with model.adapters_disabled(loaded):
            assert torch.equal(loaded(**batch, logits_to_keep=8), base_tail)  # the base checkpoint again


# ----------------------------------------------------------------------------- broken checkpoints

def broken_copy(src: str, dst: str, drop: tuple = (), write: dict | None = None) -> str:
    """`src` mirrored into `dst` by symlinks (no 40 MB copies), minus `drop`, with `write` {name: bytes} in."""
    write = write or {}
    os.makedirs(dst)
    for name in os.listdir(src):
        if name not in drop and name not in write:
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    for name, blob in write.items():
        with open(os.path.join(dst, name), "wb") as f:
            f.write(blob)
    return dst


def head(path: str, n: int) -> bytes:
    """The first n bytes of a file: what an interrupted download or copy leaves."""
    with open(path, "rb") as f:
        return f.read(n)


def json_edit(edit):
    """A mutation that rewrites a JSON file after `edit(obj)` (in place): right syntax, wrong content."""
    def make(path: str) -> bytes:
        obj = json.loads(open(path).read())
        edit(obj)
        return json.dumps(obj).encode()
    return make


def with_extra_tensor(path: str) -> bytes:
    """The safetensors file at `path` plus a tensor no Qwen2.5-VL has (as VG LLM's VGGT weights would be)."""
    tensors = load_file(path)
    tensors["model.vggt.aggregator.weight"] = torch.zeros(2)
    return save(tensors)


def drop(name: str) -> dict:
    return {"drop": (name,)}


def write(name: str, make) -> dict:
    """Replace file `name` by make(path of the original file) -> bytes."""
    return {"write": {name: make}}


SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
INDEX, WEIGHTS, MERGER = model.WEIGHTS_INDEX_FILE, model.WEIGHTS_FILE, model.GEOMETRY_FILE
ADAPTERS, ADAPTER_CONFIG = model.ADAPTER_FILE, model.ADAPTER_CONFIG_FILE

# (case, folder: "hub" sharded | "toy" single file + merger | "lora" toy + adapters, mutation,
#  the exception, the file its message must name)
BROKEN = [
    ("missing shard", "hub", drop(SHARD2), FileNotFoundError, SHARD2),
    ("truncated shard", "hub", write(SHARD1, lambda f: head(f, 1 << 20)), ValueError, SHARD1),
    ("random-bytes shard", "hub", write(SHARD2, lambda f: os.urandom(4096)), ValueError, SHARD2),
    ("index not JSON", "hub", write(INDEX, lambda f: b"{oops"), ValueError, INDEX),
    ("index promises a tensor", "hub",
     write(INDEX, json_edit(lambda o: o["weight_map"].update({"model.x": SHARD2}))), ValueError, SHARD2),
    ("missing model.safetensors", "toy", drop(WEIGHTS), FileNotFoundError, WEIGHTS),
    ("truncated model.safetensors", "toy", write(WEIGHTS, lambda f: head(f, 5000)), ValueError, WEIGHTS),
    ("random-bytes model.safetensors", "toy", write(WEIGHTS, lambda f: os.urandom(9000)), ValueError, WEIGHTS),
    ("a tensor the model has no place for", "toy", write(WEIGHTS, with_extra_tensor), ValueError, WEIGHTS),
    ("config.json not JSON", "hub", write("config.json", lambda f: b'{"model_type": '), ValueError,
     "config.json"),
    ("config.json a list", "hub", write("config.json", lambda f: b"[1, 2]"), ValueError, "config.json"),
    ("config.json string size", "hub", write("config.json", json_edit(lambda o: o.update(hidden_size="big"))),
     ValueError, "config.json"),
    ("config.json float heads", "toy",
     write("config.json", json_edit(lambda o: o["text_config"].update(num_attention_heads=2.0))), ValueError,
     "config.json"),
    ("config.json vision_config not an object", "hub",
     write("config.json", json_edit(lambda o: o.update(vision_config=5))), ValueError, "config.json"),
    ("config.json of another model", "hub",
     write("config.json", json_edit(lambda o: o.update(model_type="qwen2_vl"))), ValueError, "config.json"),
    ("config.json with more layers than the weights", "hub",
     write("config.json", json_edit(lambda o: o.update(num_hidden_layers=3))), ValueError, "config.json"),
    ("config.json wider than the weights", "hub",
     write("config.json", json_edit(lambda o: o.update(intermediate_size=1024))), ValueError, "config.json"),
    ("no tokenizer", "hub", drop("tokenizer.json"), FileNotFoundError, "tokenizer.json"),
    ("tokenizer.json garbage", "hub", write("tokenizer.json", lambda f: b"not a tokenizer"), ValueError,
     "tokenizer.json"),
    ("tokenizer_config.json not JSON", "hub", write("tokenizer_config.json", lambda f: b"{"), ValueError,
     "tokenizer_config.json"),
    ("preprocessor_config.json not JSON", "hub", write("preprocessor_config.json", lambda f: b"]"), ValueError,
     "preprocessor_config.json"),
    ("preprocessor_config.json string budget", "hub",
     write("preprocessor_config.json", json_edit(lambda o: o.update(max_pixels="a lot"))), ValueError,
     "preprocessor_config.json"),
    ("truncated geometry merger", "toy", write(MERGER, lambda f: head(f, 300)), ValueError, MERGER),
    ("rft3d.json not JSON", "toy", write(model.RFT_CONFIG_FILE, lambda f: b"{"), ValueError,
     model.RFT_CONFIG_FILE),
    ("adapters missing", "lora", drop(ADAPTERS), FileNotFoundError, ADAPTERS),
    ("adapters random bytes", "lora", write(ADAPTERS, lambda f: os.urandom(3000)), ValueError, ADAPTERS),
    ("adapter_config.json wrong types", "lora", write(ADAPTER_CONFIG, json_edit(lambda o: o.update(r="four"))),
     ValueError, ADAPTER_CONFIG),
]


@pytest.mark.parametrize("case, source, mutation, error, file", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_checkpoint_is_one_line_naming_the_file(tmp_path, hub, toy_dirs, case, source, mutation, error,
                                                       file):
    src = {"hub": hub, "toy": toy_dirs[0], "lora": toy_dirs[1]}[source]
    blobs = {name: make(os.path.join(src, name)) for name, make in mutation.get("write", {}).items()}
    folder = broken_copy(src, str(tmp_path / "broken"), drop=mutation.get("drop", ()), write=blobs)
    with pytest.raises(error) as caught:
        model.load_model(folder)
    # what the scripts print as `error: ...`: the exact type they catch, one line, the file named
    message = str(caught.value)
    assert type(caught.value) is error, message
    assert "\n" not in message and file in message, message
