"""The flags of the real-data path, on the real Qwen2.5-VL class (tests/real_checkpoint.py):

- --geometry / --geometry-dim, defined once (runtime.add_model_arguments) for sft.py, grpo.py and
  eval.py: each runs with `--geometry on --geometry-dim N` from a hub checkpoint (no merger) on
  records that carry N-feature priors; grpo's policy and reference get the same merger; a merger
  --init has is kept by auto and dropped by off; bad combinations are usage errors (exit 2, one line);
- the default completion budgets (data.max_new_tokens): the toy's for the toy tokenizer, the
  published ones + the answer tags for a real one, and grpo's default known once the policy loads;
- runtime.fit_lengths: one message for the two things it checks.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import eval as evaluation
import grpo
import model
import runtime
import sft
from tests import real_checkpoint

DIM = 5  # features per patch of the records' priors (neither the toy's 4 nor depth points' 3 / 4)
COMMON = ["--dtype", "bfloat16", "--no-progress"]
ON = ["--geometry", "on", "--geometry-dim", str(DIM)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return real_checkpoint.make_hub_checkpoint(tmp_path_factory.mktemp("hub"), layers=2, hidden=64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("geodata")
    real_checkpoint.make_records(root / "train", n=2, frames=2, size=56, geometry_dim=DIM)
    return str(root)


@pytest.fixture(scope="module")
def sft_run(hub, data_dir, tmp_path_factory):
    """2 SFT steps from the hub checkpoint with a new 5-feature merger; the run folder."""
    out = tmp_path_factory.mktemp("sft")
    sft.main(["--model", hub, *ON, "--data", data_dir, "--out", str(out), "--steps", "2", "--batch-size", "2",
              "--micro-batch", "1", "--lr", "1e-2", "--warmup", "0", *COMMON])
    return out


def merger_of(folder) -> dict:
    return load_file(os.path.join(folder, model.GEOMETRY_FILE))


def test_sft_adds_and_trains_a_merger_of_the_given_size(sft_run):
    saved = json.load(open(sft_run / "latest" / model.RFT_CONFIG_FILE))
    assert saved["geometry_dim"] == DIM
    merger = merger_of(sft_run / "latest")
    assert merger["1.weight"].shape[1] == DIM * 4  # 2x2 patches of 5 features
    assert merger["3.weight"].abs().sum() > 0  # zero-initialised, then trained
    args = json.load(open(sft_run / "latest" / "trainer_state.json"))["args"]
    assert (args["geometry"], args["geometry_dim"]) == ("on", DIM)


def test_grpo_policy_and_reference_get_the_same_merger(hub, data_dir, sft_run, tmp_path):
    base = ["--data", data_dir, "--task", "detection", "--max-new-tokens", "4", "--group-size", "2",
            "--prompts-per-step", "1", "--micro-batch", "2", *COMMON]
    # From the hub checkpoint: a new zero merger for both, which adds zeros at step 0.
    out = tmp_path / "grpo"
    grpo.main(["--init", hub, *ON, "--out", str(out), "--steps", "2", "--lr", "1e-4", *base])
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1]
    assert json.load(open(out / "latest" / model.RFT_CONFIG_FILE))["geometry_dim"] == DIM
    args = grpo.parse_args(["--init", hub, *ON, *base])
    net, ref, _, cfg = grpo.load_policy(args, runtime.Dist(), args.init)
    assert net.geometry_dim == ref.geometry_dim == cfg.geometry_dim == DIM
    features = torch.randn(3, DIM * 4)
    with torch.no_grad():
        assert torch.equal(ref.geometry_merger(features.to(torch.bfloat16)).float(), torch.zeros(3, 64))
        assert torch.equal(net.geometry_merger(features).float(), torch.zeros(3, 64))
    # From the SFT checkpoint: auto keeps its (trained) merger in both, off drops it from both.
    trained = merger_of(sft_run / "latest")
    args = grpo.parse_args(["--init", str(sft_run / "latest"), *base])
    net, ref, _, _ = grpo.load_policy(args, runtime.Dist(), args.init)
    for policy in (net, ref):  # the reference in bf16 (--dtype bfloat16), the policy's fp32 masters
        assert all(torch.equal(v, trained[k].to(v.dtype)) for k, v in policy.geometry_merger.state_dict().items())
    args = grpo.parse_args(["--init", str(sft_run / "latest"), "--geometry", "off", *base])
    net, ref, _, cfg = grpo.load_policy(args, runtime.Dist(), args.init)
    assert net.geometry_dim == ref.geometry_dim == cfg.geometry_dim == 0
    # the records' priors are then not needed, and training runs without them
    out = tmp_path / "grpo_off"
    grpo.main(["--init", str(sft_run / "latest"), "--geometry", "off", "--out", str(out), "--steps", "1", *base])
    assert json.load(open(out / "latest" / model.RFT_CONFIG_FILE))["geometry_dim"] == 0


def test_eval_with_a_new_merger(hub, data_dir, tmp_path):
    results = tmp_path / "eval.json"
    evaluation.main(["--model", hub, *ON, "--data", data_dir, "--split", "train", "--max-new-tokens", "4",
                     "--out", str(results), *COMMON])
    scored = json.load(open(results))["detection"]
    assert scored["num_samples"] == 2 and scored["max_new_tokens"] == 4


@pytest.mark.parametrize("script", ["sft", "grpo", "eval"])
def test_geometry_on_without_a_size_for_a_checkpoint_without_a_merger_is_a_usage_error(script, hub, capsys,
                                                                                         monkeypatch, tmp_path):
    main = {"sft": sft.main, "grpo": grpo.main, "eval": evaluation.main}[script]
    where = ["--init" if script == "grpo" else "--model", hub]
    monkeypatch.setattr("model.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for flags, message in ((["--geometry", "on"], f"--geometry on: {hub} has no geometry merger; give --geometry-dim N"),
                           (["--geometry-dim", "3"], "--geometry-dim 3 sizes a geometry merger: it needs --geometry on")):
        with pytest.raises(SystemExit) as stop:
            main([*where, *flags, "--data", str(tmp_path)] + (["--out", str(tmp_path / "out")] if script != "eval" else []))
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert f": error: {message}" in err[-1] and err[-1].endswith(")" if "merger;" in message else "auto)"), err
    assert not (tmp_path / "out").exists()


def test_default_budgets(hub, tmp_path):
    assert [data.max_new_tokens(t, False) for t in data.TASKS] == [400, 96, 32]  # the toy's, unchanged
    assert data.DEFAULT_MAX_NEW_TOKENS == {"detection": 400, "grounding": 96, "spatial": 32}
    # VG LLM's detection 2000 and ScanRefer 100, VSI-Bench's 16, each + 32 for the answer tags
    assert [data.max_new_tokens(t, True) for t in data.TASKS] == [2032, 132, 48]
    with pytest.raises(ValueError, match="unknown task"):
        data.max_new_tokens("captioning", True)
    net, tokenizer, cfg = model.load_model("toy")
    model.save_model(net, tokenizer, cfg, str(tmp_path / "toy"))
    assert model.is_toy_tokenizer(tokenizer) and model.is_toy_tokenizer(model.load_model(str(tmp_path / "toy"))[1])
    real = model.load_model(hub)[1]
    assert not model.is_toy_tokenizer(real)
    args = grpo.parse_args(["--task", "grounding"])
    assert args.max_new_tokens is None  # known once the policy is loaded
    assert grpo.default_budget(args, tokenizer) == 96 and grpo.default_budget(args, real) == 132


def grounding_records(folder) -> None:
    """make_records' frames and priors as grounding records (grounding.jsonl) of the same folder."""
    real_checkpoint.make_records(folder, n=2, frames=2, size=56, geometry_dim=4)
    rows = []
    for line in open(os.path.join(folder, "detection.jsonl")):
        row = json.loads(line)
        box = row.pop("boxes")[0]["bbox_3d"]
        row.update(task="grounding", gt_bbox=box, gt_frame=0, cam2global=[torch.eye(4).tolist()] * 2,
                   axis_align_matrix=torch.eye(4).tolist(),
                   conversations=[{"from": "human", "value": data.grounding_prompt(2, "the chair.")},
                                  {"from": "gpt", "value": data.grounding_answer(0, box)}])
        rows.append(json.dumps(row))
    with open(os.path.join(folder, "grounding.jsonl"), "w") as f:
        f.write("\n".join(rows) + "\n")


def test_grpo_default_budget_is_saved_and_checked_on_resume(tmp_path, monkeypatch):
    """The toy from scratch: the default budget (grounding 96) is in the checkpoint; a resume
    without the flag takes it again, one with another value stops before anything loads."""
    grounding_records(tmp_path / "data" / "train")
    out = tmp_path / "grpo"
    run = ["--init", "toy", "--task", "grounding", "--data", str(tmp_path / "data"), "--out", str(out), "--steps", "1",
           "--group-size", "2", "--prompts-per-step", "1", "--beta", "0", "--no-progress"]
    grpo.main(run)
    assert json.load(open(out / "latest" / "trainer_state.json"))["args"]["max_new_tokens"] == 96
    grpo.main(run + ["--resume"])  # the default again: accepted (the run is complete, nothing to do)
    assert json.load(open(out / "latest" / "trainer_state.json"))["step"] == 1
    # a run with a budget of its own, resumed without the flag: the default differs (told after loading)
    other = [*run[:run.index("--out")], "--out", str(tmp_path / "grpo8"), *run[run.index("--out") + 2:]]
    grpo.main(other + ["--max-new-tokens", "8"])
    with pytest.raises(SystemExit, match=r"--max-new-tokens 96 \(checkpoint: 8\)"):
        grpo.main(other + ["--resume"])
    monkeypatch.setattr("model.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit, match=r"--max-new-tokens 8 \(checkpoint: 96\)"):
        grpo.main(run + ["--resume", "--max-new-tokens", "8"])


def test_fit_lengths_says_what_it_checked(tmp_path, capsys):
    records = real_checkpoint.make_records(tmp_path, n=2, frames=2, size=56, geometry_dim=4)
    records[1]["conversations"][0]["value"] += " Be precise, and list every object you see." * 3
    _, tokenizer, cfg = model.load_model("toy")
    lengths = [data.sequence_length(r, tokenizer, cfg) for r in records]
    limit = lengths[0]
    kept = runtime.fit_lengths(records, tokenizer, cfg, limit, skip_bad=True)
    assert kept == records[:1]
    err = capsys.readouterr().err
    assert f"skipped 1 record(s) too long for --max-seq-len {limit}, or no usable geometry prior; the first: " in err
    with pytest.raises(data.RecordError, match=f"detection.jsonl:2: {lengths[1]} tokens"):
        runtime.fit_lengths(records, tokenizer, cfg, limit)  # without --skip-bad: the record's own line
    wide = model.ImageConfig(geometry_dim=DIM)  # a model whose merger takes 5 features: no usable prior
    with pytest.raises(data.RecordError, match=r"^no record left: all 2 too long for --max-seq-len 100000, or no "
                                               r"usable geometry prior; the first: .*has 4 features per patch"):
        runtime.fit_lengths(records, tokenizer, wide, 100_000, skip_bad=True)
