"""GRPO: advantages and loss against independent computations, gradients, DDP parity, resume, NaN guard."""
import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import grpo
import rewards
from tests.test_model_data import make_records
from tests.test_sft import TORCHRUN, run_until_deadline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- advantages

def test_group_advantages_worked_example_and_loop():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.7, 0.1, 0.9])
    adv = grpo.group_advantages(r, group_size=4)
    expected = []
    for g in range(2):  # independent: Python's statistics module, sample std (divisor G - 1)
        group = r[4 * g:4 * g + 4].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        expected += [(x - mean) / (std + 1e-4) for x in group]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)
    assert adv[:4].tolist() == pytest.approx([0.8659, -0.8659, -0.8659, 0.8659], abs=1e-4)
    unscaled = grpo.group_advantages(r, 4, scale=False)
    assert unscaled[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_zero_std_group_gets_exactly_zero():
    r = torch.tensor([0.3] * 8 + [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    adv = grpo.group_advantages(r, group_size=8)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].abs().sum() > 0


# ----------------------------------------------------------------------------- loss

def loop_loss(logp, old, ref, adv, mask, eps, eps_high, beta, agg):
    """The GRPO objective written as plain Python loops over sequences and tokens."""
    total, tokens, seq_terms = 0.0, 0, []
    for i in range(logp.shape[0]):
        seq_sum, seq_len = 0.0, 0
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            r = math.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            obj = min(r * a, min(max(r, 1 - eps), 1 + eps_high) * a)
            d = float(ref[i, t] - logp[i, t])
            obj -= beta * (math.exp(d) - d - 1)
            seq_sum += obj
            seq_len += 1
        total += seq_sum
        tokens += seq_len
        seq_terms.append(seq_sum / max(seq_len, 1))
    return -total / tokens if agg == "token-mean" else -sum(seq_terms) / len(seq_terms)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_loss_matches_a_plain_loop(agg, eps_high):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g)  # ratios well outside the clip range too
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    loss, stats = grpo.grpo_loss(logp, old, ref, adv, mask, eps=0.2, eps_high=eps_high, beta=0.04, agg=agg)
    expected = loop_loss(logp, old, ref, adv, mask, 0.2, eps_high or 0.2, 0.04, agg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert 0 <= stats["clip_frac"] <= 1 and stats["kl"] > 0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_one_pass_gradient_is_policy_gradient_plus_kl(agg):
    """mu = 1: d loss = d[-A logp] averaged as the aggregation says + beta d KL."""
    g = torch.Generator().manual_seed(1)
    B, T, beta = 4, 6, 0.1
    logp = (-torch.rand(B, T, generator=g) * 2).requires_grad_()
    ref = logp.detach() + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T)
    mask[2, 3:] = 0
    loss, _ = grpo.grpo_loss(logp, logp.detach(), ref, adv, mask, beta=beta, agg=agg)
    (grad,) = torch.autograd.grad(loss, logp)

    logp2 = logp.detach().clone().requires_grad_()
    delta = ref - logp2
    per_token = (-adv[:, None] * logp2 + beta * (torch.exp(delta) - delta - 1)) * mask
    if agg == "token-mean":
        reference = per_token.sum() / mask.sum()
    else:
        reference = (per_token.sum(1) / mask.sum(1)).mean()
    (expected,) = torch.autograd.grad(reference, logp2)
    torch.testing.assert_close(grad, expected)


def test_clipping_stops_the_gradient_where_ppo_says():
    eps = 0.2
    old = torch.zeros(4, 1)
    # ratios: 1.5 (above), 1.5 (above), 0.5 (below), 0.5 (below); advantages +, -, -, +
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, stats = grpo.grpo_loss(logp, old, None, adv, torch.ones(4, 1), eps=eps, beta=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad[0].item() == 0 and grad[2].item() == 0  # clipped: ratio pushed past the range already
    assert grad[1].item() != 0 and grad[3].item() != 0  # PPO keeps the pessimistic, unclipped side
    assert stats["clip_frac"] == pytest.approx(0.5)
    loss_hi, _ = grpo.grpo_loss(logp, old, None, adv, torch.ones(4, 1), eps=eps, eps_high=0.6, beta=0.0)
    (grad_hi,) = torch.autograd.grad(loss_hi, logp)
    assert grad_hi[0].item() != 0  # clip-higher lets the positive-advantage token move up to 1.6


def test_zero_std_group_has_no_policy_gradient():
    logp = (-torch.rand(8, 5)).requires_grad_()
    adv = grpo.group_advantages(torch.tensor([0.5] * 4 + [0.0, 1.0, 0.0, 1.0]), group_size=4)
    loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv, torch.ones(8, 5), beta=0.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.equal(grad[:4], torch.zeros(4, 5)) and grad[4:].abs().sum() > 0


def test_completion_mask_stops_at_first_eos():
    ids = torch.tensor([[4, 9, 2, 2, 0], [1, 2, 3, 4, 5], [2, 0, 0, 0, 0]])
    mask, truncated = grpo.completion_mask(ids, eos_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    mask, truncated = grpo.completion_mask(torch.tensor([[5, 6, 7]]), eos_id=2)
    assert mask.tolist() == [[1, 1, 1]] and truncated.tolist() == [True]


# ----------------------------------------------------------------------------- sampling

def test_row_sampler_draws_from_the_softmax():
    """Gumbel-max per row: token frequencies match softmax(logits / T), an independent computation."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -float("inf")]])
    T, n = 0.7, 20000
    sampler = grpo.row_sampler([123], temperature=T)
    counts = torch.zeros(4)
    for _ in range(n):
        counts[sampler(None, logits.clone()).argmax()] += 1
    expected = torch.softmax(logits / T, -1)[0]
    assert counts[3] == 0  # a suppressed token is never drawn
    assert (counts / n).tolist() == pytest.approx(expected.tolist(), abs=0.015)


def test_samples_do_not_depend_on_the_batch(data_dir):
    """All groups of a step in one generate: each group still gets the samples of its own seed."""
    import data
    import model

    net, tokenizer, cfg = model.load_model("toy")
    records = data.load_records(os.path.join(data_dir, "train"), "detection", limit=2)
    records[1]["conversations"][0]["value"] += " Be precise."  # prompts of different lengths: left padding
    args = grpo.parse_args(["--group-size", "3", "--max-new-tokens", "10"])
    banned = model.special_token_ids(tokenizer, net.lm.config.text_config.vocab_size)
    setup = grpo.Setup(args, tokenizer, cfg, banned)
    prompts = [grpo.prepare_prompt(net, r, setup) for r in records]
    assert prompts[0]["input_ids"].shape[1] != prompts[1]["input_ids"].shape[1]
    pad = tokenizer.pad_token_id
    both = grpo.sample_groups(net, prompts, [11, 22], setup)
    first = grpo.sample_groups(net, prompts[:1], [11], setup)
    second = grpo.sample_groups(net, prompts[1:], [22], setup)
    width = both.shape[1]
    pad_to = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad)
    assert torch.equal(both, torch.cat([pad_to(first), pad_to(second)]))
    assert not torch.equal(both[0], both[1])  # the G samples of a group differ


def test_prefill_once_per_group_matches_prefill_per_sample(data_dir):
    """sample_groups prefills each prompt once and copies its cache G times; the samples must be
    those of the plain way, every one of the B*G rows prefilled on its own (left padding too)."""
    import data
    import model

    net, tokenizer, cfg = model.load_model("toy")
    records = data.load_records(os.path.join(data_dir, "train"), "detection", limit=2)
    records[1]["conversations"][0]["value"] += " Be precise."  # prompts of different lengths
    G, pad = 3, tokenizer.pad_token_id
    args = grpo.parse_args(["--group-size", str(G), "--max-new-tokens", "12", "--temperature", "0.7"])
    banned = model.special_token_ids(tokenizer, net.lm.config.text_config.vocab_size)
    setup = grpo.Setup(args, tokenizer, cfg, banned)
    prompts = [grpo.prepare_prompt(net, r, setup) for r in records]
    once = grpo.sample_groups(net, prompts, [11, 22], setup)
    batch = grpo.stack_prompts([p for p in prompts for _ in range(G)], pad)      # B*G full prompts
    embeds = net.fuse_geometry(batch["vision"], batch["image_grid_thw"], batch["geometry"])
    row_seeds = [int(np.random.default_rng([s, g]).integers(2**63)) for s in (11, 22) for g in range(G)]
    per_sample = net.generate(batch, image_embeds=embeds, do_sample=False, max_new_tokens=12, suppress_tokens=banned,
                              logits_processor=[grpo.row_sampler(row_seeds, 0.7)])
    assert torch.equal(once, per_sample)
    assert len({tuple(row.tolist()) for row in once}) > 2  # real samples, not one repeated answer


def test_completion_logprobs_match_a_plain_per_row_computation(data_dir):
    """Batched, left-padded scoring of only the completion positions equals scoring each row
    alone (no padding, all logits, a loop over its tokens), with the same masking and temperature."""
    import data
    import model

    net, tokenizer, cfg = model.load_model("toy")
    net.eval()
    records = data.load_records(os.path.join(data_dir, "train"), "detection", limit=2)
    records[1]["conversations"][0]["value"] += " Be precise."  # prompts of different lengths
    G, T, temperature = 2, 6, 0.7
    banned = model.special_token_ids(tokenizer, net.lm.config.text_config.vocab_size)
    setup = grpo.Setup(grpo.parse_args([]), tokenizer, cfg, banned)
    prompts = [grpo.prepare_prompt(net, r, setup) for r in records]
    ids = torch.randint(10, 200, (len(records) * G, T))
    ids[1, 3] = tokenizer.eos_token_id  # row 1 stops early: its last two tokens are masked
    mask, _ = grpo.completion_mask(ids, tokenizer.eos_token_id)
    ro = grpo.Rollouts(records, prompts, ids, mask, torch.zeros(len(ids), dtype=torch.bool), [""] * len(ids),
                       torch.zeros(len(ids)), pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        batched = grpo.completion_logprobs(net, ro, list(range(len(ids))), banned, temperature)
        for row in range(len(ids)):
            expected = one_row_logprobs(net, prompts[row // G], ids[row], banned, temperature, vision=prompts[row // G]["vision"])
            torch.testing.assert_close(batched[row], expected * mask[row], rtol=1e-4, atol=1e-4)


def one_row_logprobs(net, prompt: dict, ids: torch.Tensor, banned, temperature: float, **visual) -> torch.Tensor:
    """log p of each of one row's completion tokens, the plain way: its prompt and completion alone
    (no padding, no shared cache) through one ordinary forward, all logits, (T,)."""
    P, T = prompt["input_ids"].shape[1], len(ids)
    logits = net(input_ids=torch.cat([prompt["input_ids"], ids[None]], 1),
                 attention_mask=torch.ones(1, P + T, dtype=torch.long),
                 mm_token_type_ids=torch.cat([prompt["mm_token_type_ids"], torch.zeros(1, T, dtype=torch.long)], 1),
                 image_grid_thw=prompt["image_grid_thw"], geometry=prompt["geometry"], **visual)[0]
    scores = logits[P - 1:P - 1 + T].float()  # the prompt's last position predicts completion token 0
    scores = scores.masked_fill(torch.isin(torch.arange(scores.shape[-1]), torch.tensor(banned)), -float("inf"))
    return torch.log_softmax(scores / temperature, -1).gather(-1, ids[:, None]).squeeze(-1)


def test_shared_prompt_pass_gives_the_gradient_of_one_pass_per_row(data_dir):
    """The prompt runs once per group and its KV cache is copied over the G completions; the
    gradient must still be that of scoring every row on its own (prompt + completion through the
    plain forward), since the prompt's positions carry gradient too. Rows of both prompts in one
    call, prompts of different lengths (left padding), and the ViT trained (reuse_vision=False)."""
    import data
    import model

    net, tokenizer, cfg = model.load_model("toy")
    records = data.load_records(os.path.join(data_dir, "train"), "detection", limit=2)
    records[1]["conversations"][0]["value"] += " Be precise."
    G, T = 3, 5
    banned = model.special_token_ids(tokenizer, net.lm.config.text_config.vocab_size)
    setup = grpo.Setup(grpo.parse_args([]), tokenizer, cfg, banned)
    prompts = [grpo.prepare_prompt(net, r, setup) for r in records]
    ids = torch.randint(10, 200, (len(records) * G, T))
    mask = torch.ones_like(ids)
    ro = grpo.Rollouts(records, prompts, ids, mask, torch.zeros(len(ids), dtype=torch.bool), [""] * len(ids),
                       torch.zeros(len(ids)), pad_id=tokenizer.pad_token_id)
    weights = torch.randn(len(ids), T)  # an arbitrary loss, so that every token's gradient counts

    def gradients(loss):
        net.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    rows = [1, 2, 3, 4]  # the last two of prompt 0, the first two of prompt 1
    shared = gradients((grpo.completion_logprobs(net, ro, rows, banned, 1.0, reuse_vision=False) * weights[rows]).sum())
    per_row = sum((one_row_logprobs(net, prompts[row // G], ids[row], banned, 1.0,
                                    pixel_values=prompts[row // G]["pixel_values"]) * weights[row]).sum() for row in rows)
    plain = gradients(per_row)
    assert shared.keys() == plain.keys() and any(n.startswith("lm.model.visual") for n in plain)
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="increasing order"):
        grpo.completion_logprobs(net, ro, [3, 1], banned, 1.0)


# ----------------------------------------------------------------------------- the loop

def digit_share(completion: str, record: dict) -> float:
    """A test reward that varies across the random toy model's samples: share of digits."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def run_grpo(argv: list) -> None:
    """grpo.py's main with the test reward, in 2 processes under torchrun (this file's __main__)."""
    out = run_until_deadline(TORCHRUN + ["-m", "tests.test_grpo"] + argv)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpodata")
    make_records(root / "train", n=4)
    return str(root)


def base_args(data_dir, out, steps=2):
    return ["--init", "toy", "--data", data_dir, "--out", str(out), "--steps", str(steps), "--prompts-per-step", "2",
            "--group-size", "4", "--max-new-tokens", "12", "--reward", "digits=1", "--lr", "1e-3", "--warmup", "1",
            "--micro-batch", "4", "--no-progress", "--save-every", "1"]


def final_weights(out):
    return load_file(os.path.join(out, "latest", "model.safetensors"))


def metric_lines(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one(data_dir, tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(rewards.REWARDS, "digits", digit_share)
    grpo.main(base_args(data_dir, tmp_path / "one", steps=1))  # on one thread, as each torchrun process
    run_grpo(base_args(data_dir, tmp_path / "two", steps=1))
    one, two = metric_lines(tmp_path / "one"), metric_lines(tmp_path / "two")
    assert one[0]["reward"] == pytest.approx(two[0]["reward"], abs=1e-6)  # same samples
    assert one[0]["reward_std"] > 0 and one[0]["grad_norm"] > 0  # a real gradient step
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_grpo_raises_its_reward(data_dir, tmp_path, monkeypatch):
    """End to end: rollout -> rewards -> advantages -> update must climb the reward it is given.

    The loss tests check the formula; this checks the wiring around it (each reward paired with
    its own completion, the advantage's sign, the optimiser really stepping). From the random toy
    model the share of digits in a completion rises from ~0.1 to ~1.0 within 40 steps; with the
    advantages negated (checked by hand) it falls to ~0.0003 instead.
    """
    monkeypatch.setitem(rewards.REWARDS, "digits", digit_share)
    out = tmp_path / "learn"
    grpo.main(base_args(data_dir, out, steps=40) + ["--lr", "1e-2", "--beta", "0", "--save-every", "0"])
    reward = [line["reward"] for line in metric_lines(out) if "reward" in line]
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    assert last > first + 0.15, (first, last)
    assert os.path.exists(os.path.join(out, "latest", "model.safetensors"))  # --save-every 0: the final one


def test_bookkeeping_flags_are_checked_up_front(capsys):
    for flag, value, why in (("--log-every", "0", "must be >= 1, got 0"), ("--save-every", "-1", "must be >= 0"),
                             ("--steps", "0", "must be >= 1"), ("--eval-limit", "x", "'x' is not an integer")):
        with pytest.raises(SystemExit):
            grpo.parse_args([flag, value])
        assert f"argument {flag}: {why}" in capsys.readouterr().err


def test_resume_is_exact(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "digits", digit_share)
    grpo.main(base_args(data_dir, tmp_path / "full", steps=3))
    grpo.main(base_args(data_dir, tmp_path / "cut", steps=3) + ["--stop-after", "1"])
    # Spelled differently but the same settings: "digits=1.0" for "digits=1", "data/" for "data".
    respelled = {"digits=1": "digits=1.0", data_dir: data_dir + "/"}
    same = [respelled.get(a, a) for a in base_args(data_dir, tmp_path / "cut", steps=3)]
    grpo.main(same + ["--resume"])
    drop = ("time", "rollout_s", "update_s", "tokens_per_s")
    strip = lambda lines: [{k: v for k, v in line.items() if k not in drop} for line in lines]
    assert strip(metric_lines(tmp_path / "cut")) == strip(metric_lines(tmp_path / "full"))
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Resuming with another reward or learning rate would splice two runs: refused in one line,
    # nothing written. The reward is named by its flag, compared as parsed weights.
    before = final_weights(tmp_path / "cut")
    with pytest.raises(SystemExit, match=r"--reward \{'digits': 2.0\} \(checkpoint: \{'digits': 1.0\}\)"):
        grpo.main([{"digits=1": "digits=2"}.get(a, a) for a in base_args(data_dir, tmp_path / "cut", steps=3)] + ["--resume"])
    with pytest.raises(SystemExit, match=r"--lr 0.002 \(checkpoint: 0.001\)"):
        grpo.main(base_args(data_dir, tmp_path / "cut", steps=3) + ["--resume", "--lr", "2e-3"])
    # Checked before the optimiser state is loaded: another trained-parameter set is the same one line.
    with pytest.raises(SystemExit, match=r"--train-vision True \(checkpoint: False\)"):
        grpo.main(base_args(data_dir, tmp_path / "cut", steps=3) + ["--resume", "--train-vision"])
    assert all(torch.equal(before[k], v) for k, v in final_weights(tmp_path / "cut").items())


def test_resume_checks_come_before_any_model_load(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "digits", digit_share)
    out = tmp_path / "early"
    with pytest.raises(SystemExit, match="nothing to resume: .*latest does not exist"):
        grpo.main(base_args(data_dir, out) + ["--resume"])
    grpo.main(base_args(data_dir, out, steps=2) + ["--stop-after", "1"])
    # A refused resume must not cost a model load (minutes for a real checkpoint).
    monkeypatch.setattr(grpo.model_lib, "load_model", lambda *a, **k: pytest.fail("model loaded before the check"))
    with pytest.raises(SystemExit, match="--lr 0.002"):
        grpo.main(base_args(data_dir, out, steps=2) + ["--resume", "--lr", "2e-3"])


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "digits", digit_share)
    out = tmp_path / "nan"
    grpo.main(base_args(data_dir, out, steps=2) + ["--stop-after", "1"])
    before = final_weights(out)
    real = grpo.completion_logprobs
    monkeypatch.setattr(grpo, "completion_logprobs", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite GRPO loss.*nothing was saved"):
        grpo.main(base_args(data_dir, out, steps=2) + ["--resume"])
    after = final_weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.load(open(os.path.join(out, "latest", "trainer_state.json")))["step"] == 1


def test_missing_default_checkpoint_is_one_line(tmp_path):
    make_records(tmp_path / "data" / "toy" / "train", n=1)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py")], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "python sft.py" in out.stderr


def test_padding_after_eos_gives_finite_logprobs(data_dir, monkeypatch):
    """Completions that stop early are padded with a (banned) pad token: scores must stay finite."""
    import data
    import model

    net, tokenizer, cfg = model.load_model("toy")
    records = data.load_records(os.path.join(data_dir, "train"), "detection", limit=1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    fixed = torch.tensor([[5, 6, eos, pad], [7, eos, pad, pad], [5, 5, 5, 5], [eos, pad, pad, pad]])
    monkeypatch.setattr(grpo, "sample_groups", lambda *a, **k: fixed.clone())
    args = grpo.parse_args(["--group-size", "4", "--reward", "format=1"])
    ro = grpo.rollout(net, records, [0], grpo.Setup(args, tokenizer, cfg, model.special_token_ids(tokenizer)))
    assert ro.completion_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ro.truncated.tolist() == [False, False, True, False]
    logp = grpo.completion_logprobs(net, ro, [0, 1, 2, 3], model.special_token_ids(tokenizer), 1.0)
    assert torch.isfinite(logp).all() and (logp[ro.completion_mask == 0] == 0).all()
    ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, _ = grpo.grpo_loss(logp, logp.detach(), logp.detach(), ro.advantages, ro.completion_mask)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logprobs_equal_the_plain_full_vocabulary_ones(dtype):
    """grpo.token_logprobs (row chunks, checkpointed) against log_softmax over all rows at once:
    the same values and the same gradients, bit for bit, in fp32 and from bf16 logits."""
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (3, 5))
    targets[0, 0] = 7  # a banned target scores -inf, as in the plain computation
    banned = [7, 11, 49]

    def plain(x):
        z = x.float()
        z = z.masked_fill(torch.isin(torch.arange(50), torch.tensor(banned)), -float("inf"))
        return torch.log_softmax(z / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    weights = torch.rand(3, 5)
    weights[0, 0] = 0
    expected = plain(logits)
    (grad_expected,) = torch.autograd.grad((expected.masked_fill(weights == 0, 0) * weights).sum(), logits)
    got = grpo.token_logprobs(logits, targets, banned, 0.7)
    (grad_got,) = torch.autograd.grad((got.masked_fill(weights == 0, 0) * weights).sum(), logits)
    assert torch.equal(got, expected) and got[0, 0] == -float("inf")
    assert torch.equal(grad_got, grad_expected)
    with torch.no_grad():  # the reference pass: no checkpointing, same numbers
        assert torch.equal(grpo.token_logprobs(logits, targets, banned, 0.7, rows_per_chunk=2), expected)


if __name__ == "__main__":  # run_grpo's entry point, in each of torchrun's processes
    rewards.REWARDS["digits"] = digit_share
    grpo.main(sys.argv[1:])
