"""Tests of the geometry prior's real-data path (data.py "Geometry priors", model.load_model / geometry_from_flags).

Features from .npy / .safetensors files (one per record or per frame) on VGGT's grids, resampled
to the ViT patch grid by the documented rule; per-patch 3D points from depth maps and poses;
a model that needs a prior refusing a record without one in one line; load_model adding a merger
of a given size to the toy and to a checkpoint in the hub's layout, then a forward pass.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

import data
import model
import scenes
from tests import real_checkpoint as rc

BOX = [{"label": "chair", "bbox_3d": [1, 0, 2, .5, .8, .5, 0, 0, .3]}]


def write_records(folder, rows: list[dict], size=(112, 112), frames: int = 2) -> str:
    """detection.jsonl of `rows` (extra keys per record) with `frames` random frames of size (w, h) each."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "frames"), exist_ok=True)
    lines = []
    for r, extra in enumerate(rows):
        images = []
        for i in range(frames):
            name = f"frames/{r}_{i}.png"
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(folder, name))
            images.append(name)
        record = {"id": f"r{r}", "task": "detection", "images": images, "boxes": BOX,
                  "conversations": [{"from": "human", "value": data.detection_prompt(frames)},
                                    {"from": "gpt", "value": data.detection_answer(BOX)}], **extra}
        lines.append(json.dumps(record))
    path = os.path.join(folder, "detection.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def toy_config(dim):
    """The toy model's image config, for a model whose merger takes `dim` features (0 = none)."""
    return model.ImageConfig(geometry_dim=dim)


@pytest.fixture(scope="module")
def toy():
    return model.load_model("toy")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A shrunk Qwen2.5-VL-3B-Instruct in the hub's layout (no geometry merger)."""
    return rc.make_hub_checkpoint(tmp_path_factory.mktemp("hub"), layers=1, hidden=64, vision_layers=1)


# ----------------------------------------------------------------------------- the resampling rule

def test_resampling_is_exact_on_matching_grids():
    features = np.random.default_rng(0).normal(size=(5, 7, 3)).astype(np.float32)
    assert data.resample_geometry(features, (5, 7)) is features  # a no-op, not a copy
    source, footprint = data.geometry_source((8, 8), (112, 112), (8, 8), 2)
    assert source == "vit" and footprint.span_y == (0.0, 8.0)
    assert data.resample_geometry(features, (5, 7), (0, 5), (0, 7)) is features
    # "frame" on the ViT's own grid is the same no-op
    assert data.geometry_source((8, 8), (112, 112), (8, 8), 2, "frame")[1].span_x == (0.0, 8.0)


def test_bilinear_2x2_to_4x4_by_hand_and_as_interpolate():
    features = np.array([[0.0, 1.0], [2.0, 3.0]], np.float32)[..., None]  # value = x + 2 y
    # Patch centres at (k + 0.5) / 4 of the frame read cell-centre index 0.5 k - 0.25, clamped to [0, 1].
    w = np.array([0.0, 0.25, 0.75, 1.0])
    expected = w[None, :] + 2 * w[:, None]
    np.testing.assert_allclose(data.resample_geometry(features, (4, 4))[..., 0], expected, atol=1e-7)
    # A whole-frame footprint is F.interpolate(bilinear, align_corners=False), up and down.
    rng = np.random.default_rng(0)
    for source, grid in (((28, 37), (34, 46)), ((28, 37), (26, 36)), ((3, 5), (8, 4))):
        f = rng.normal(size=(*source, 6)).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(f).permute(2, 0, 1)[None], size=grid, mode="bilinear",
                            align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(data.resample_geometry(f, grid), ref, atol=1e-5)


@pytest.mark.parametrize("source, grid", [("vggt_crop", (28, 37)), ("vgllm", (28, 36)), ("vggt_pad", (37, 37))])
def test_vggt_footprints_put_each_feature_where_its_pixels_are(source, grid):
    """Features whose value is the frame position they saw come back as the ViT patch centres' positions."""
    height, width, vit = 480, 640, (34, 46)
    footprint = data.source_footprint(source, (height, width), vit, 2)
    assert footprint.grid == grid and data.geometry_source(grid, (height, width), vit, 2)[0] == source
    nh, nw = 392, 518  # VGGT resizes a 640 x 480 frame to 518 x 392 in both modes
    top = (518 - nh) // 2 if source == "vggt_pad" else 0
    rows = (np.arange(grid[0]) + 0.5) * 14 - top  # cell centres in resized pixels of the frame
    cols = (np.arange(grid[1]) + 0.5) * 14
    features = np.stack(np.broadcast_arrays(rows[:, None] / nh * height, cols[None, :] / nw * width), -1)
    out = data.resample_geometry(features.astype(np.float32), vit, footprint.span_y, footprint.span_x)
    centre_y = (np.arange(vit[0]) + 0.5) / vit[0] * height
    centre_x = (np.arange(vit[1]) + 0.5) / vit[1] * width
    # bilinear reproduces a linear function wherever it does not clamp at the border cells
    inside_y = (centre_y > features[0, 0, 0]) & (centre_y < features[-1, 0, 0])
    inside_x = (centre_x > features[0, 0, 1]) & (centre_x < features[0, -1, 1])
    np.testing.assert_allclose(out[inside_y, 0, 0], centre_y[inside_y], atol=1e-3)
    np.testing.assert_allclose(out[0, inside_x, 1], centre_x[inside_x], atol=1e-3)


def test_unknown_grids_and_declared_sources():
    with pytest.raises(data.RecordError, match=r"geometry grid \(30, 40\) does not match the image patch grid "
                                               r"\(34, 46\) nor VGGT's grids .*\(28, 37\) vggt_crop") as e:
        data.geometry_source((30, 40), (480, 640), (34, 46), 2)
    assert "\n" not in str(e.value)
    assert data.geometry_source((30, 40), (480, 640), (34, 46), 2, "frame")[0] == "frame"
    with pytest.raises(data.RecordError, match="not what geometry_source 'vggt_pad' makes"):
        data.geometry_source((28, 37), (480, 640), (34, 46), 2, "vggt_pad")
    # A portrait frame: crop mode cuts its height (not covered), pad mode keeps it.
    assert data.source_footprint("vggt_crop", (640, 480), (46, 34), 2) is None
    assert data.geometry_source((37, 37), (640, 480), (46, 34), 2)[0] == "vggt_pad"


def test_vggt_features_for_640x480_frames_batch_with_a_real_image_config(tmp_path, toy):
    """VG LLM's 28 x 36 and VGGT's 28 x 37 grids, at Qwen2.5-VL-3B's preprocessor settings (34 x 46 patches)."""
    net, tokenizer, _ = toy
    processor = tmp_path / "processor"
    processor.mkdir()
    (processor / "preprocessor_config.json").write_text(json.dumps(rc.PREPROCESSOR_CONFIG))
    cfg = model.image_config_from_dir(str(processor), net.lm.config)
    cfg.geometry_dim = net.geometry_dim  # 4, as load_model sets it
    rng = np.random.default_rng(0)
    np.save(tmp_path / "vgllm.npy", rng.normal(size=(1, 28, 36, 4)).astype(np.float32))
    np.save(tmp_path / "vggt.npy", rng.normal(size=(1, 28, 37, 4)).astype(np.float32))
    np.save(tmp_path / "wrong.npy", rng.normal(size=(1, 30, 40, 4)).astype(np.float32))
    path = write_records(str(tmp_path), [{"geometry": "vgllm.npy"}, {"geometry": "vggt.npy"},
                                         {"geometry": "wrong.npy"}], size=(640, 480), frames=1)
    records, _ = data.load_records_checked(path)  # headers, counts and values: all fine
    kept, dropped = data.check_lengths(records, tokenizer, cfg, 100_000, skip_bad=True)
    assert len(kept) == 2 and len(dropped) == 1
    assert "detection.jsonl:3: geometry grid (30, 40) does not match the image patch grid (34, 46)" in dropped[0]
    batch = data.collate(kept, tokenizer, cfg)
    assert batch["image_grid_thw"].tolist() == [[1, 34, 46]] * 2
    assert batch["geometry"].shape == (2 * 17 * 23, 4 * 4)
    with torch.no_grad():
        logits = net(**data.collate(kept[:1], tokenizer, cfg), logits_to_keep=1)
    assert torch.isfinite(logits).all()
    with pytest.raises(data.RecordError, match=r"detection\.jsonl:3: geometry grid \(30, 40\)"):
        data.collate(records[2:], tokenizer, cfg)


# ----------------------------------------------------------------------------- feature files

def test_safetensors_and_per_frame_files_give_the_npy_features(tmp_path, toy):
    _, tokenizer, cfg = toy
    # multiples of 1/8 below 16: exact in bfloat16
    prior = (np.random.default_rng(0).integers(-64, 64, size=(2, 8, 8, 4)) / 8).astype(np.float32)
    np.save(tmp_path / "all.npy", prior)
    save_torch({"vggt_features": torch.from_numpy(prior).bfloat16()}, str(tmp_path / "one.safetensors"))
    save_numpy({"0": prior[0], "1": prior[1]}, str(tmp_path / "frames.safetensors"))
    np.save(tmp_path / "f0.npy", prior[0])
    save_numpy({"x": prior[1:2]}, str(tmp_path / "f1.safetensors"))  # (1, Hp, Wp, C) is one frame too
    rows = [{"geometry": g} for g in ("all.npy", "one.safetensors", "frames.safetensors",
                                      ["f0.npy", "f1.safetensors"])]
    records, _ = data.load_records_checked(write_records(str(tmp_path), rows))
    data.check_lengths(records, tokenizer, cfg, 10_000)
    tokens = [data.load_visual_inputs(r, cfg)[2] for r in records]
    assert all(torch.equal(t, tokens[0]) for t in tokens[1:])
    assert torch.equal(tokens[0], data.geometry_to_tokens(prior, torch.tensor([[1, 8, 8]] * 2), 2))


@pytest.mark.parametrize("name, write, message", [
    ("nan", lambda p: save_numpy({"f": np.full((2, 8, 8, 4), np.nan, np.float32)}, p),
     r"geometry .*bad\.safetensors: tensor 'f' holds non-finite values"),
    ("names", lambda p: save_numpy({"a": np.zeros((8, 8, 4), np.float32), "b": np.zeros((8, 8, 4), np.float32)}, p),
     r"geometry .*bad\.safetensors holds tensors \['a', 'b'\]: give one tensor"),
    ("gap", lambda p: save_numpy({"0": np.zeros((8, 8, 4), np.float32), "2": np.zeros((8, 8, 4), np.float32)}, p),
     r"geometry .*bad\.safetensors holds tensors \['0', '2'\]"),
    ("frames", lambda p: save_numpy({"f": np.zeros((3, 8, 8, 4), np.float32)}, p),
     r"geometry .*bad\.safetensors has 3 frames for 2 images"),
    ("corrupt", lambda p: open(p, "wb").write(b"not a safetensors file"),
     r"geometry .*bad\.safetensors is not a readable \.safetensors file"),
])
def test_bad_safetensors_are_one_line_naming_file_and_record(tmp_path, name, write, message):
    write(str(tmp_path / "bad.safetensors"))
    path = write_records(str(tmp_path), [{"geometry": "bad.safetensors"}])
    with pytest.raises(data.RecordError, match=r"detection\.jsonl:1: " + message) as e:
        data.load_records_checked(path)
    assert "\n" not in str(e.value)


def test_per_frame_file_lists_are_checked(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((8, 8, 4), np.float32))
    np.save(tmp_path / "two.npy", np.zeros((2, 8, 8, 4), np.float32))
    path = write_records(str(tmp_path), [{"geometry": ["f.npy"]}])
    with pytest.raises(data.RecordError, match=r"detection\.jsonl:1: 'geometry' lists 1 files for 2 images"):
        data.load_records_checked(path)
    path = write_records(str(tmp_path), [{"geometry": ["f.npy", "two.npy"]}])
    with pytest.raises(data.RecordError, match=r"geometry .*two\.npy has shape \(2, 8, 8, 4\); a per-frame file"):
        data.load_records_checked(path)


# ----------------------------------------------------------------------------- 3D points from depth

def wall_record(folder, depth_mm=2000, shift=(1.0, 0.0, 0.5), depth_size=112, npy=False) -> dict:
    """Two 112 x 112 frames of a flat wall `depth_mm` away, the second camera moved by `shift`."""
    depths = []
    for i in range(2):
        name = os.path.join(folder, f"d{i}.npy" if npy else f"d{i}.png")
        depth = np.full((depth_size, depth_size), depth_mm, np.uint16)
        if npy:
            np.save(name, depth.astype(np.float64) / 1000)
        else:
            Image.fromarray(depth).save(name)
        depths.append(name)
    moved = np.eye(4)
    moved[:3, 3] = shift
    intrinsics = [[100, 0, 56, 0], [0, 100, 56, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    return {"depths": depths, "cam2img": intrinsics, "cam2global": [np.eye(4).tolist(), moved.tolist()]}


@pytest.mark.parametrize("depth_size, npy", [(112, False), (56, False), (112, True)])
def test_depth_points_of_a_flat_wall_by_hand(tmp_path, depth_size, npy):
    record = wall_record(str(tmp_path), depth_size=depth_size, npy=npy)
    points = data.depth_points(record, [(112, 112)] * 2, [(8, 8)] * 2, dim=3)
    # patch (i, j) covers pixels 14 i .. 14 i + 13: mean pixel centre 14 i + 7, so
    # x = (14 j + 7 - 56) / 100 * 2, y likewise, z = 2 (the depth map's own size does not matter)
    centre = (14 * np.arange(8) + 7 - 56) / 100 * 2.0
    expected = np.stack(np.broadcast_arrays(centre[None, :], centre[:, None], 2.0), -1)
    np.testing.assert_allclose(points[0], expected, atol=1e-6)
    np.testing.assert_allclose(points[1], expected + np.array([1.0, 0.0, 0.5]), atol=1e-6)  # in camera 0


def test_depth_without_measurements_and_the_valid_share(tmp_path):
    record = wall_record(str(tmp_path), npy=True)
    depth = np.load(record["depths"][0])
    depth[:14, :7] = 0.0  # half of patch (0, 0) has no depth
    depth[:14, 14:28] = np.nan  # patch (0, 1) none at all
    np.save(record["depths"][0], depth)
    points = data.depth_points(record, [(112, 112)] * 2, [(8, 8)] * 2, dim=4)[0]
    assert points[0, 0, 3] == 0.5 and points[0, 1, 3] == 0.0 and points[1, 1, 3] == 1.0
    np.testing.assert_allclose(points[0, 0, 0], (10.5 - 56) / 100 * 2, atol=1e-6)  # mean of u + 0.5 in 7..13
    assert points[0, 1, :3].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(data.RecordError, match="give 3 or 4 features per patch, but the model's geometry merger takes 5"):
        data.depth_points(record, [(112, 112)] * 2, [(8, 8)] * 2, dim=5)


def test_depth_fallback_reproduces_the_synthetic_worlds_prior(tmp_path):
    """The toy world's depth PNGs + poses give its geometry .npy back (to the depth's millimetre rounding)."""
    scenes.generate(str(tmp_path), "train", 1)
    records = data.load_records(str(tmp_path / "train"), "detection")
    cfg = toy_config(4)
    for record in records[:2]:
        expected = data.load_visual_inputs(record, cfg)[2]
        from_depth = dict(record, geometry=None,
                          depths=[p.replace("/frames/", "/depth/") for p in record["images"]])
        got = data.load_visual_inputs(data.check_record(from_depth, "x"), cfg)[2]
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-3)  # measured: 2e-4


def test_depths_keys_are_checked_at_load(tmp_path):
    record = wall_record(str(tmp_path))
    bad = dict(record, cam2global=record["cam2global"][:1])
    no_intrinsics = {k: v for k, v in record.items() if k != "cam2img"}
    same_map_twice = dict(record, depths=[record["depths"][0]] * 2)
    path = write_records(str(tmp_path), [record, bad, no_intrinsics, same_map_twice])
    Image.fromarray(np.zeros((112, 112), np.uint8)).save(tmp_path / "eight_bit.png")
    records, skipped = data.load_records_checked(path, skip_bad=True)
    assert len(records) == 2 and len(skipped) == 2
    assert "detection.jsonl:2: 'cam2global' needs one 4x4 pose per image (2)" in skipped[0]
    assert "detection.jsonl:3: 'depths' needs ['cam2img']" in skipped[1]
    path = write_records(str(tmp_path), [dict(record, depths=[str(tmp_path / "eight_bit.png")] * 2)])
    with pytest.raises(data.RecordError, match=r"detection\.jsonl:1: depth .*eight_bit\.png is a L image; "
                                               r"a depth PNG holds 16-bit millimetres"):
        data.load_records_checked(path)


# ----------------------------------------------------------------------------- what the model needs

def test_a_geometry_model_refuses_a_record_without_a_prior_in_one_line(tmp_path, toy):
    net, tokenizer, cfg = toy
    assert cfg.geometry_dim == 4
    path = write_records(str(tmp_path), [{}, {}])
    records, _ = data.load_records_checked(path)
    message = (r"detection\.jsonl:1: no geometry prior, but the model fuses one \(4 features per patch\): "
               r"give the record 'geometry' .* or 'depths' .*--geometry off")
    with pytest.raises(data.RecordError, match=message) as e:
        data.collate(records, tokenizer, cfg)
    assert "\n" not in str(e.value)
    with pytest.raises(data.RecordError, match=message):  # at load time, before any step
        data.check_lengths(records, tokenizer, cfg, 10_000)
    assert data.check_lengths(records, tokenizer, cfg, 10_000, skip_bad=True)[0] == []
    # the model without its prior takes the same records; a bare model refuses a batch without geometry
    assert data.collate(records, tokenizer, toy_config(0))["geometry"] is None
    batch = data.collate(records, tokenizer, toy_config(None))
    with pytest.raises(ValueError, match=r"this model fuses a geometry prior \(4 features per patch\) but the "
                                         r"batch carries none"):
        net(**batch)
    # the wrong feature size is named too, at load time
    np.save(tmp_path / "g.npy", np.zeros((2, 8, 8, 5), np.float32))
    records, _ = data.load_records_checked(write_records(str(tmp_path), [{"geometry": "g.npy"}]))
    with pytest.raises(data.RecordError, match=r"geometry .*g\.npy has 5 features per patch; the model's geometry "
                                               r"merger takes 4 \(--geometry-dim\)"):
        data.check_lengths(records, tokenizer, cfg, 10_000)


def test_geometry_from_flags():
    assert model.geometry_from_flags("auto") == (None, None)
    assert model.geometry_from_flags("on") == (True, None)
    assert model.geometry_from_flags("off") == (False, None)
    assert model.geometry_from_flags("on", 2048) == (True, 2048)
    # a size goes with on only: with auto it would silently replace a saved merger of another size
    for flag, dim, message in (("off", 3, r"needs --geometry on \(got --geometry off\)"),
                               ("auto", 3, r"needs --geometry on \(got --geometry auto\)"),
                               ("on", 0, "positive integer"), ("maybe", None, "one of auto, on, off")):
        with pytest.raises(ValueError, match=message):
            model.geometry_from_flags(flag, dim)


def test_toy_with_a_3_feature_merger_trains_on_depth_points(tmp_path, toy):
    net3, tokenizer, cfg = model.load_model("toy", *model.geometry_from_flags("on", 3))
    assert net3.geometry_dim == 3 and cfg.geometry_dim == 3
    assert net3.geometry_merger[1].in_features == 3 * 4
    base = dict(toy[0].lm.named_parameters())  # the LLM and ViT are those of the default toy
    assert all(torch.equal(p, base[n]) for n, p in net3.lm.named_parameters())
    path = write_records(str(tmp_path), [dict(wall_record(str(tmp_path)), geometry=None)])
    records, _ = data.load_records_checked(path)
    data.check_lengths(records, tokenizer, cfg, 10_000)
    batch = data.collate(records, tokenizer, cfg)
    assert batch["geometry"].shape == (32, 12)
    logits = net3(**batch)
    logits.sum().backward()
    assert net3.geometry_merger[1].weight.grad.abs().sum() > 0


def test_hub_checkpoint_gains_a_zero_merger_and_runs(tmp_path, hub):
    with pytest.raises(ValueError, match=r"has no geometry merger: give geometry_dim .*--geometry-dim"):
        model.load_model(hub, *model.geometry_from_flags("on"))
    net, tokenizer, cfg = model.load_model(hub, *model.geometry_from_flags("on", 3))
    assert (net.geometry_dim, cfg.geometry_dim) == (3, 3)
    plain = model.RFTModel(net.lm, geometry_dim=0)  # the same weights without the prior
    assert (cfg.min_pixels, cfg.max_pixels) == (3136, 12845056)  # the hub's preprocessor config
    path = write_records(str(tmp_path), [dict(wall_record(str(tmp_path)), geometry=None)])
    records, _ = data.load_records_checked(path)
    batch = data.collate(records, tokenizer, cfg)
    with torch.no_grad():
        fused = net(**batch)
        reference = plain(**dict(batch, geometry=None))
    assert torch.equal(fused, reference)  # a zero-initialised merger adds exact zeros at step 0
    model.save_model(net, tokenizer, cfg, str(tmp_path / "ckpt"))
    saved = json.loads((tmp_path / "ckpt" / model.RFT_CONFIG_FILE).read_text())
    assert saved["geometry_dim"] == 3 and "geometry_dim" not in saved["image_config"]
    again, _, again_cfg = model.load_model(str(tmp_path / "ckpt"))
    assert again.geometry_dim == 3 and again_cfg.geometry_dim == 3
    # what the scripts' flag check reads without loading: the merger's size, 0 for none
    assert [model.saved_geometry_dim(p) for p in ("toy", hub, str(tmp_path / "ckpt"), str(tmp_path))] == [4, 0, 3, None]
