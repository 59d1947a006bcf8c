"""Tests of data.py (sampling, records, patchify, batching) and model.py (toy model, save/load)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model
from tests import real_checkpoint


# ----------------------------------------------------------------------------- fixtures

def make_records(folder, n=2, frames=4, geometry_dim=4, seed=0):
    """Hand-made detection records with random 112 x 112 frames and a random geometry prior."""
    return real_checkpoint.make_records(folder, n, frames, 112, geometry_dim, seed)


@pytest.fixture(scope="module")
def toy():
    return model.load_model("toy")


# ----------------------------------------------------------------------------- data

def test_sample_frame_indices():
    assert data.sample_frame_indices(10, 4) == [0, 3, 6, 9]
    assert data.sample_frame_indices(1, 3) == [0, 0, 0]
    assert data.sample_frame_indices(10, 3, mode="stride", stride=2, start=1) == [1, 3, 5]
    with pytest.raises(ValueError, match="do not fit"):
        data.sample_frame_indices(5, 3, mode="stride", stride=3)
    with pytest.raises(ValueError, match="unknown frame sampling"):
        data.sample_frame_indices(5, 3, mode="random")


def test_read_video_frames_from_folder(tmp_path):
    for i in range(6):
        Image.fromarray(np.full((28, 28, 3), i, np.uint8)).save(tmp_path / f"{i:03d}.png")
    frames = data.read_video_frames(str(tmp_path), 3)
    assert [int(f[0, 0, 0]) for f in frames] == [0, 2, 5]  # linspace(0, 5, 3) rounded
    with pytest.raises(FileNotFoundError):
        data.read_video_frames(str(tmp_path / "missing.mp4"), 3)


def test_malformed_records_give_clear_errors(tmp_path):
    path = tmp_path / "detection.jsonl"
    path.write_text('{"task": "detection", "images": ["a.png"]}\n')
    with pytest.raises(data.RecordError, match=r"detection.jsonl:1: detection record lacks key"):
        data.load_records(str(path))
    path.write_text("{not json\n")
    with pytest.raises(data.RecordError, match="not valid JSON"):
        data.load_records(str(path))
    record = {"task": "detection", "images": ["a.png", "b.png"], "boxes": [],
              "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "[]"}]}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(data.RecordError, match="1 <image> placeholders for 2 images"):
        data.load_records(str(path))
    with pytest.raises(FileNotFoundError, match="records not found"):
        data.load_records(str(tmp_path / "nope.jsonl"))


def test_patchify_matches_a_direct_pixel_lookup():
    """Independent check of the patch layout: look every patch up in the image by hand."""
    cfg = model.ImageConfig()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)
    pixel_values, grid = data.images_to_patches([image], cfg)
    assert grid.tolist() == [[1, 4, 6]]
    norm = (image.astype(np.float32) / 255 - np.array(cfg.image_mean)) / np.array(cfg.image_std)
    p, m = cfg.patch_size, cfg.merge_size
    row = 0
    for bh in range(4 // m):  # merged blocks in raster order, then the 2x2 patches inside a block
        for bw in range(6 // m):
            for dh in range(m):
                for dw in range(m):
                    y, x = (bh * m + dh) * p, (bw * m + dw) * p
                    patch = norm[y:y + p, x:x + p].transpose(2, 0, 1)  # (3, p, p)
                    expected = np.stack([patch, patch], axis=1).reshape(-1)  # (3, t, p, p)
                    np.testing.assert_allclose(pixel_values[row].numpy(), expected, atol=1e-5)
                    row += 1


def test_geometry_rows_follow_patch_order():
    grid = torch.tensor([[1, 4, 4]])
    prior = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)  # value = patch raster index
    rows = data.geometry_to_tokens(prior, grid, merge=2)
    assert rows.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="does not match"):
        data.geometry_to_tokens(prior, torch.tensor([[1, 8, 8]]), merge=2)


def test_collate_masks_exactly_the_answer(tmp_path, toy):
    _, tokenizer, cfg = toy
    records = make_records(tmp_path)
    batch = data.collate(records, tokenizer, cfg)
    for row, record in enumerate(records):
        answer_ids = batch["input_ids"][row][batch["loss_mask"][row].bool()]
        assert tokenizer.decode(answer_ids) == data.target_text(record)
    # 4 frames x 16 visual tokens per row, flagged for the 3-D rotary positions
    assert batch["mm_token_type_ids"].sum(1).tolist() == [64, 64]
    assert batch["geometry"].shape == (128, 16)
    prompts = data.collate(records, tokenizer, cfg, with_answer=False)
    assert prompts["loss_mask"].sum() == 0


# ----------------------------------------------------------------------------- model

def test_tokenizer_round_trips_and_keeps_words_whole(toy):
    _, tokenizer, _ = toy
    text = '<think></think><answer>[{"label":"chair","bbox_3d":[1.23,-0.45]}]</answer>'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert "chair" in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(tokenizer("§ weird ünïcode")["input_ids"], skip_special_tokens=True) != ""


def test_answer_numbers_are_two_tokens_each(toy):
    """Every 2-decimal answer number is "<signed integer>." + "<two decimals>", whatever its sign."""
    _, tokenizer, _ = toy
    for value in (0.0, -0.05, 1.8, 3.27, -9.99, 9.5):
        text = data.format_number(value)
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert pieces == [text[:-2], text[-2:]], (value, pieces)
    box = '","bbox_3d":[1.68,-0.05,1.80,0.94,1.29,0.52,0.00,0.44,-0.31]}'
    ids = tokenizer(box, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 9 * 2 + 8 + 1 and tokenizer.decode(ids) == box  # piece, numbers, commas, "]}"


def test_forward_and_generate_agree(tmp_path, toy):
    """Greedy generation and a teacher-forced forward pass give the same tokens (positions agree)."""
    net, tokenizer, cfg = toy
    torch.manual_seed(0)
    for p in net.geometry_merger.parameters():  # make the prior matter in this check
        torch.nn.init.normal_(p, std=0.1)
    records = make_records(tmp_path)
    prompts = data.collate(records, tokenizer, cfg, with_answer=False)
    new = net.generate(prompts, max_new_tokens=8, do_sample=False,
                       suppress_tokens=model.special_token_ids(tokenizer))
    assert new.shape[0] == 2
    full = dict(prompts, input_ids=torch.cat([prompts["input_ids"], new], 1),
                attention_mask=torch.cat([prompts["attention_mask"], torch.ones_like(new)], 1),
                mm_token_type_ids=torch.cat([prompts["mm_token_type_ids"], torch.zeros_like(new)], 1))
    with torch.no_grad():
        logits = net(**full)
    logits[..., model.special_token_ids(tokenizer)] = -float("inf")
    L = prompts["input_ids"].shape[1]
    assert torch.equal(logits[:, L - 1:-1].argmax(-1), new)


def test_save_and_load_round_trip(tmp_path, toy):
    net, tokenizer, cfg = toy
    records = make_records(tmp_path / "d")
    batch = data.collate(records, tokenizer, cfg)
    model.save_model(net, tokenizer, cfg, str(tmp_path / "ckpt"))
    net2, tok2, cfg2 = model.load_model(str(tmp_path / "ckpt"))
    assert cfg2 == cfg and len(tok2) == len(tokenizer)
    with torch.no_grad():
        assert torch.equal(net(**batch), net2(**batch))
    no_geometry, _, _ = model.load_model(str(tmp_path / "ckpt"), geometry=False)
    assert no_geometry.geometry_dim == 0


def test_patch_projection_is_the_convolution(toy):
    """The ViT's patch embedding as one matmul: the Conv3d's output and gradients, its weight name."""
    net, _, _ = toy
    proj = net.lm.model.visual.patch_embed.proj
    assert type(proj) is model.PatchProjection
    assert "lm.model.visual.patch_embed.proj.weight" in net.state_dict()  # checkpoints unchanged
    torch.manual_seed(0)
    patches = torch.randn(40, *proj.weight.shape[1:], requires_grad=True)
    conv = torch.nn.Conv3d(proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride, bias=False)
    conv.weight.data.copy_(proj.weight.data)
    ours, reference = proj(patches), conv(patches)  # the independent computation: torch's Conv3d
    assert ours.shape == reference.shape == (40, proj.out_channels, 1, 1, 1)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), (patches, w)) for out, w in ((ours, proj.weight), (reference, conv.weight))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        model.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model.load_model(str(tmp_path))


def test_toy_model_runs_on_generated_scenes(tmp_path, toy):
    """The real path: scenes.py writes records, data.py batches them, the toy model runs and generates."""
    import scenes

    scenes.generate(str(tmp_path), "train", 2)
    net, tokenizer, cfg = toy
    for task in data.TASKS:
        records = data.load_records(str(tmp_path / "train"), task, limit=2)
        batch = data.collate(records, tokenizer, cfg)
        with torch.no_grad():
            logits = net(**batch)
        assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
        prompts = data.collate(records, tokenizer, cfg, with_answer=False)
        new = net.generate(prompts, max_new_tokens=6, do_sample=True, num_return_sequences=2,
                           suppress_tokens=model.special_token_ids(tokenizer))
        assert new.shape[0] == 2 * len(records)


def test_records_without_task_key_take_it_from_the_file(tmp_path):
    """Real VG LLM records carry no "task": the file name (or the task argument) supplies it."""
    record = {"images": ["a.png"], "boxes": [],
              "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "[]"}]}
    (tmp_path / "detection.jsonl").write_text(json.dumps(record) + "\n")
    assert data.load_records(str(tmp_path / "detection.jsonl"))[0]["task"] == "detection"
    assert data.load_records(str(tmp_path), "detection")[0]["task"] == "detection"


def test_geometry_switch_on_a_checkpoint_needs_a_dimension(tmp_path, toy):
    net, tokenizer, cfg = toy
    plain = model.RFTModel(net.lm, geometry_dim=0)
    model.save_model(plain, tokenizer, cfg, str(tmp_path))
    with pytest.raises(ValueError, match="give geometry_dim"):
        model.load_model(str(tmp_path), geometry=True)
    loaded, _, _ = model.load_model(str(tmp_path), geometry=True, geometry_dim=6)
    assert loaded.geometry_dim == 6


def test_banned_ids_cover_specials_and_unused_rows(toy):
    _, tokenizer, _ = toy
    banned = model.special_token_ids(tokenizer, vocab_size=len(tokenizer) + 3)
    assert tokenizer.eos_token_id not in banned
    assert tokenizer.pad_token_id in banned and tokenizer.convert_tokens_to_ids(data.IMAGE_PAD) in banned
    assert banned[-3:] == [len(tokenizer), len(tokenizer) + 1, len(tokenizer) + 2]
    assert tokenizer.convert_tokens_to_ids("<answer>") not in banned  # format tags stay sampleable


def test_image_config_reads_both_pixel_budget_spellings(tmp_path, toy):
    net = toy[0]
    config = net.lm.config

    def read(processor: dict) -> model.ImageConfig:
        with open(tmp_path / "preprocessor_config.json", "w") as f:
            json.dump(processor, f)
        return model.image_config_from_dir(str(tmp_path), config)

    newer = read({"size": {"shortest_edge": 3136, "longest_edge": 12845056}, "image_mean": [0.5, 0.5, 0.5]})
    assert (newer.min_pixels, newer.max_pixels, newer.image_mean) == (3136, 12845056, (0.5, 0.5, 0.5))
    older = read({"min_pixels": 1000, "max_pixels": 2000, "size": {"shortest_edge": 3136, "longest_edge": 9}})
    assert (older.min_pixels, older.max_pixels) == (1000, 2000)       # explicit keys win
    nulls = read({"min_pixels": None, "max_pixels": None, "size": {"shortest_edge": 3136, "longest_edge": 9999}})
    assert (nulls.min_pixels, nulls.max_pixels) == (3136, 9999)      # null means "not set"
    default = model.ImageConfig()
    plain = read({"size": {"height": 224, "width": 224}})              # another processor's size: ignored
    assert (plain.min_pixels, plain.max_pixels) == (default.min_pixels, default.max_pixels)
