"""Stage 2 of 3D-RFT: reinforcement fine-tuning with GRPO and verifiable rewards.

After the SFT warm-up, 3D-RFT optimises the evaluation metrics themselves. For each prompt (frames
+ question) the policy samples a group of G answers; each answer gets a reward computed by the
same code as the benchmark metric (3D IoU, detection F1, frame distance, QA accuracy / MRA, plus a
format reward); rewards are normalised within the group into advantages; the policy is pushed
towards the better-than-average answers with a clipped, PPO-style token-level objective and a KL
penalty to the frozen SFT model:

    A_i     = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + 1e-4)                      (group advantage)
    r_i,t   = exp(logp_new - logp_old)                                               (token ratio)
    KL_i,t  = exp(logp_ref - logp) - (logp_ref - logp) - 1                          (k3 estimator)
    L       = -(1 / sum_i T_i) sum_i sum_t [ min(r A_i, clip(r, 1-eps, 1+eps) A_i) - beta KL_i,t ]

One step = three plain functions, as in GRPO-Zero:
    1. `rollout`          sample G completions per prompt, score them   -> Rollouts
    2. `group_advantages` normalise rewards within each group           -> advantages
    3. `update_policy`    the clipped objective over micro-chunks        -> gradient step
The per-prompt work is done once per group: the frozen ViT over the frames, and the prompt's pass
through the LLM, whose KV cache is copied over the G completions when sampling (`model.prefill`)
and when scoring them for the policy and reference passes (`completion_logprobs`); the
per-completion work is kept separate. All the
step's groups are sampled in one batched `generate` (a CPU decoding step costs about the same for
8 rows as for 64), each row from its own random stream so that samples do not depend on batching.

Run:  python grpo.py                        (from runs/sft/latest, toy data, CPU)
      torchrun --nproc_per_node=2 grpo.py   (prompts split over processes; each group stays on one)
      torchrun --nproc_per_node=2 grpo.py --fsdp  (the same, policy and reference sharded)
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

# Repeatable CPU runs: MKL otherwise picks matrix-multiply kernels by buffer alignment, so two runs
# (or a run and its resume) drift apart in the last bits; read when torch loads (docs/DESIGN.md section 8).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

import data
import eval as evaluation
import model as model_lib
import rewards
import runtime

# =====================================================================================
# Settings (every one is a flag; the defaults are the toy demo's)
# =====================================================================================

DEFAULT_INIT = "runs/sft/latest"  # written by `python sft.py`


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    at_least = runtime.int_at_least
    # ---- what to train, on what
    p.add_argument("--init", type=os.path.normpath, default=DEFAULT_INIT,
                   help="policy to start from (an SFT checkpoint folder; 'toy' = random)")
    p.add_argument("--data", type=os.path.normpath, default="data/toy",
                   help="data folder holding <split>/<task>.jsonl, or one published records file")
    p.add_argument("--split", default="train", help="split to draw prompts from")
    p.add_argument("--task", default="detection", choices=data.TASKS,
                   help="task whose prompts and rewards are used")
    p.add_argument("--limit", type=at_least(1), default=None, help="use at most this many prompts")
    p.add_argument("--out", type=os.path.normpath, default="runs/grpo",
                   help="run folder: metrics.jsonl, samples.jsonl, checkpoint 'latest/'")
    runtime.add_data_arguments(p)
    runtime.add_model_arguments(p, training=True)
    # ---- rewards. Paper: R = R_format + R_task, with R_det = R_IoU + R_F1, R_grd = R_frame + R_IoU
    # and R_spatial = accuracy or MRA by question type (rewards.TASK_REWARDS).
    p.add_argument("--reward", default=None,
                   help="reward weights, e.g. 'format=1,iou=1,f1=1' (names from rewards.REWARDS); "
                        "default: the task's")
    # ---- GRPO. The paper gives no G, eps, temperature; these are the usual GRPO values (TRL's).
    p.add_argument("--steps", type=at_least(1), default=60, help="GRPO steps (one rollout batch each)")
    p.add_argument("--prompts-per-step", type=at_least(1), default=8,
                   help="prompts per step over all processes")
    p.add_argument("--group-size", type=at_least(2), default=8,
                   help="G: completions sampled per prompt (advantages compare answers within a group)")
    p.add_argument("--temperature", type=runtime.number(0, above=True), default=1.0,
                   help="sampling temperature (log-probs use the same)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=None,
                   help="completion budget (default: the task's, data.max_new_tokens: "
                        + ", ".join(f"{k} {data.max_new_tokens(k, False)}" for k in data.TASKS) + " for the toy, "
                        + ", ".join(f"{k} {data.max_new_tokens(k, True)}" for k in data.TASKS)
                        + " for a real checkpoint: VG LLM's / VSI-Bench's + 32 for the answer tags)")
    p.add_argument("--eps", type=runtime.number(0, 1), default=0.2,
                   help="clip range: ratio kept within [1-eps, 1+eps_high]")
    p.add_argument("--eps-high", type=runtime.number(0), default=None,
                   help="upper clip (DAPO's clip-higher); default = --eps")
    # Paper: beta > 0 for perception; beta = 0 (no reference model) for spatial reasoning with LoRA.
    p.add_argument("--beta", type=runtime.number(0), default=0.04,
                   help="KL penalty to the frozen initial policy (0 = no reference model)")
    # Paper: the token-level mean ("token-mean"); DeepSeekMath's GRPO averages per sequence first.
    p.add_argument("--loss-agg", choices=["token-mean", "seq-mean"], default="token-mean",
                   help="token-mean: mean over all completion tokens (the paper); "
                        "seq-mean: per sequence first (DeepSeekMath)")
    p.add_argument("--scale-rewards", choices=["group", "none"], default="group",
                   help="group: divide by the group's std (+1e-4, the paper's A_i); none: mean-centre only")
    p.add_argument("--mu", type=at_least(1), default=1,
                   help="optimisation passes per rollout batch (old log-probs kept when > 1)")
    p.add_argument("--micro-batch", type=at_least(1), default=8,
                   help="sequences per forward/backward (gradient accumulation)")
    # ---- optimiser (not given by the paper)
    p.add_argument("--lr", type=runtime.number(0, above=True), default=3e-4,
                   help="learning rate (1e-6 for a real 3B model; the toy needs more)")
    p.add_argument("--warmup", type=at_least(0), default=5, help="linear warm-up steps, then constant")
    p.add_argument("--weight-decay", type=runtime.number(0), default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=runtime.number(0), default=1.0,
                   help="clip the global gradient norm (0 = off)")
    p.add_argument("--train-vision", action="store_true", help="also train the ViT (frozen in the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt order and of the sampling")
    # ---- bookkeeping: logs, samples, checkpoints, periodic evaluation, resume, device
    runtime.add_run_arguments(p, log_every=1, save_every=20)
    p.add_argument("--sample-every", type=at_least(0), default=10,
                   help="steps between logged sample completions (0 = none)")
    args = p.parse_args(argv)
    try:
        default = dict(rewards.TASK_REWARDS[args.task])
        args.weights = rewards.parse_weights(args.reward) if args.reward else default
        rewards.check_weights(args.weights, args.task)  # an empty set, or rewards of another task
    except ValueError as e:
        p.error(str(e))
    runtime.check_model_arguments(p, args, args.init)  # --geometry / --geometry-dim
    # --max-new-tokens left out (None) is the task's default for the model, set once it is loaded
    # (`default_budget`): the toy's and a real checkpoint's differ.
    return args


def default_budget(args, tokenizer) -> int:
    """The task's completion budget for this policy's tokenizer (data.max_new_tokens)."""
    return data.max_new_tokens(args.task, real=not model_lib.is_toy_tokenizer(tokenizer))


@dataclass
class Setup:
    """What every phase of a step reads besides the models: the flags, the tokenizer, the process."""

    args: argparse.Namespace  # the run's settings (G, temperature, eps, beta, micro-batch, ...)
    tokenizer: PreTrainedTokenizerFast
    image_cfg: model_lib.ImageConfig  # the pixel budget and patch geometry of the frames
    banned: list[int]  # token ids never sampled nor scored (model.special_token_ids)
    proc: runtime.Dist = field(default_factory=runtime.Dist)  # rank, world size, device


# =====================================================================================
# 1. Rollouts: sample G completions per prompt and score them
# =====================================================================================


@dataclass
class Rollouts:
    """One rollout batch: B prompts x G completions, rows ordered prompt-major (row = b * G + g)."""

    records: list[dict]  # the B prompts' records
    prompts: list[dict]  # per prompt: its collated prompt batch (one row) and frozen visual tokens
    completion_ids: torch.Tensor  # (B*G, T) sampled tokens, padding after EOS
    completion_mask: torch.Tensor  # (B*G, T) 1 up to and including the first EOS
    truncated: torch.Tensor  # (B*G,) True where no EOS came within the budget
    texts: list[str]  # decoded completions
    rewards: torch.Tensor  # (B*G,) weighted total reward
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # each reward, (B*G,)
    pad_id: int = 0  # the tokenizer's padding id
    advantages: torch.Tensor | None = None  # (B*G,)
    old_logp: torch.Tensor | None = None  # (B*G, T) when mu > 1


def completion_mask(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of the tokens up to and including the first EOS, and which rows never emit EOS.

    >>> completion_mask(torch.tensor([[5, 2, 0], [5, 6, 7]]), eos_id=2)
    (tensor([[1, 1, 0],
            [1, 1, 1]]), tensor([False,  True]))
    """
    is_eos = ids == eos_id
    has_eos = is_eos.any(1)
    no_eos = torch.full_like(has_eos, ids.shape[1], dtype=torch.long)  # past the last column
    first = torch.where(has_eos, is_eos.float().argmax(1), no_eos)
    mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= first.unsqueeze(1)).long()
    return mask, ~has_eos


def prepare_prompt(net: model_lib.RFTModel, record: dict, setup: Setup) -> dict:
    """The per-prompt work, done once per group: tokenised prompt + frozen ViT output of its frames."""
    batch = data.collate([record], setup.tokenizer, setup.image_cfg, with_answer=False)
    batch = data.to_device(batch, setup.proc.device)
    with torch.no_grad():
        batch["vision"] = net.vision_tokens(batch["pixel_values"], batch["image_grid_thw"])
    return batch


def stack_prompts(prompts: list[dict], pad_id: int) -> dict:
    """Several prepared prompts as one left-padded batch (their visual tokens concatenated in order).

    Used for sampling (all the step's groups in one `generate`) and for scoring completions.
    """
    width = max(p["input_ids"].shape[1] for p in prompts)

    def left_pad(key: str, value: int) -> torch.Tensor:
        return torch.cat([F.pad(p[key], (width - p[key].shape[1], 0), value=value) for p in prompts])

    geometry = [p["geometry"] for p in prompts]
    return {
        "input_ids": left_pad("input_ids", pad_id),
        "attention_mask": left_pad("attention_mask", 0),
        "mm_token_type_ids": left_pad("mm_token_type_ids", 0),
        "image_grid_thw": torch.cat([p["image_grid_thw"] for p in prompts]),
        "vision": torch.cat([p["vision"] for p in prompts]),
        "geometry": None if geometry[0] is None else torch.cat(geometry),
    }


def row_sampler(seeds: list[int], temperature: float):
    """A logits processor that makes greedy decoding sample, each row from its own random stream.

    Gumbel-max: argmax(logits / T + g) with g = -log(-log(U)), U ~ Uniform(0, 1), is a sample from
    softmax(logits / T). Drawing g from one generator per row (rather than torch's global one)
    makes a completion depend only on its own seed, not on which other prompts share the batch:
    one process or several, the same prompt gets the same samples. Suppressed tokens arrive as
    -inf and stay -inf. The generators live on the logits' device (created at the first decoding
    step), so a GPU run draws its noise there instead of moving rows x vocabulary numbers from
    the CPU at every token; a CPU and a GPU run therefore draw different (equally valid) samples.
    """
    generators: list[torch.Generator] = []

    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not generators:
            generators.extend(torch.Generator(device=scores.device).manual_seed(s) for s in seeds)
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device, dtype=torch.float64)
                         for g in generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return scores / temperature + gumbel.to(scores.dtype)

    return process


@torch.no_grad()
def sample_groups(net: model_lib.RFTModel, prompts: list[dict], seeds: list[int],
                  setup: Setup) -> torch.Tensor:
    """G completions of every prompt, all groups in one KV-cached `generate`; (B*G, new_tokens).

    The shared work runs once per prompt: its visual tokens (computed in prepare_prompt) are
    fused with the geometry prior and the prompt is prefilled once, its KV cache then copied G
    times (model.prefill). Decoding runs over B*G rows, prompt-major (row = b * G + g): greedy
    over logits that row_sampler has perturbed, which samples; row b * G + g draws from the seed
    (seeds[b], g). For video prompts of thousands of visual tokens the prefill is most of the
    rollout's compute, so doing it once instead of G times is the saving (docs/DESIGN.md, "The
    per-group work, done once").
    """
    args = setup.args
    batch = stack_prompts(prompts, setup.tokenizer.pad_token_id)
    embeds = net.fuse_geometry(batch["vision"], batch["image_grid_thw"], batch["geometry"])
    prefilled = net.prefill(batch, embeds, copies=args.group_size)
    row_seeds = [int(np.random.default_rng([s, g]).integers(2**63))
                 for s in seeds for g in range(args.group_size)]
    return net.generate_from(
        batch, prefilled, copies=args.group_size, do_sample=False, max_new_tokens=args.max_new_tokens,
        suppress_tokens=setup.banned, logits_processor=[row_sampler(row_seeds, args.temperature)],
    )


def score(texts: list[str], records: list[dict], weights: dict[str, float], group_size: int):
    """Weighted total reward per completion and each component (rewards.py; bad text scores 0)."""
    totals, parts = [], {name: [] for name in weights}
    for i, text in enumerate(texts):
        total, components = rewards.total_reward(text, records[i // group_size], weights)
        totals.append(total)
        for name in weights:
            parts[name].append(components.get(name, 0.0))
    return torch.tensor(totals, dtype=torch.float32), {k: torch.tensor(v) for k, v in parts.items()}


def rollout(net: model_lib.RFTModel, records: list[dict], seeds: list[int], setup: Setup) -> Rollouts:
    """Sample a group per prompt, pad the completions to one length, mask after EOS, score.

    `seeds` holds one sampling seed per prompt (see prompt_seed).
    """
    net.eval()
    tokenizer, pad_id = setup.tokenizer, setup.tokenizer.pad_token_id
    prompts = [prepare_prompt(net, record, setup) for record in records]
    ids = sample_groups(net, prompts, seeds, setup).cpu()
    mask, truncated = completion_mask(ids, tokenizer.eos_token_id)
    ids = ids.masked_fill(mask == 0, pad_id)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    total, components = score(texts, records, setup.args.weights, setup.args.group_size)
    return Rollouts(records, prompts, ids, mask, truncated, texts, total, components, pad_id=pad_id)


# =====================================================================================
# 2. Advantages: normalise rewards within each group
# =====================================================================================


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """A_i = (R_i - mean(group)) / (std(group) + 1e-4), std with divisor G - 1 (torch.std's default).

    `rewards` is (B*G,), prompt-major. A group whose rewards are all equal carries no signal and
    gets exactly A = 0. With scale=False the advantage is only mean-centred.

    >>> group_advantages(torch.tensor([1., 0., 0., 1., 2., 2., 2., 2.]), group_size=4)
    tensor([ 0.8659, -0.8659, -0.8659,  0.8659,  0.0000,  0.0000,  0.0000,  0.0000])
    """
    grouped = rewards.view(-1, group_size).float()
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + 1e-4)
    flat = grouped.max(1, keepdim=True).values == grouped.min(1, keepdim=True).values
    return centred.masked_fill(flat, 0.0).flatten()


# =====================================================================================
# 3. The GRPO loss
# =====================================================================================


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.04,
    agg: str = "token-mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective with a k3 KL penalty, as a loss to minimise.

    logp, old_logp, ref_logp, mask: (batch, T) per completion token; advantages: (batch,).
    Per token: obj = min(r A, clip(r, 1 - eps, 1 + eps_high) A) - beta KL, with r = exp(logp - old_logp).
    agg="token-mean": loss = -sum(obj * mask) / sum(mask)                      (3D-RFT, DAPO)
    agg="seq-mean":   loss = -mean_i [ sum_t(obj * mask)_i / sum_t mask_i ]    (DeepSeekMath GRPO)
    `normalizer` replaces the denominator (the token or sequence count of the *global* batch)
    when a batch is split into micro-chunks and processes.

    Worked example (one pass, so old_logp = logp.detach() and r = 1, beta = 0):
        logp = [[-1, -2]], mask = [[1, 1]], A = [0.5]  ->  obj = [0.5, 0.5], loss = -0.5,
        and d loss / d logp = [[-0.25, -0.25]] = -A / (number of tokens).
    """
    eps_high = eps if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype).unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps_high) * adv
    objective = torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        objective = objective - beta * kl
    if agg == "token-mean":
        loss = -(objective * mask).sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))
    elif agg == "seq-mean":
        per_seq = (objective * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = -per_seq.sum() / (normalizer if normalizer is not None else per_seq.numel())
    else:
        raise ValueError(f"unknown loss aggregation {agg!r} (token-mean or seq-mean)")
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        # A token is clipped when the min picked the clipped term and it differs (no gradient flows).
        is_clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps))
        stats = {"kl": float((kl * mask).sum() / tokens),
                 "clip_frac": float((is_clipped.to(mask.dtype) * mask).sum() / tokens),
                 "ratio": float((ratio * mask).sum() / tokens), "tokens": float(mask.sum())}
    return loss, stats


# =====================================================================================
# Log-probabilities of completions under a model
# =====================================================================================


def completion_logprobs(net, rollouts: Rollouts, rows: list[int], banned: list[int], temperature: float,
                        reuse_vision: bool = True) -> torch.Tensor:
    """log p(completion token | frames, prompt, earlier tokens) for the given rows, (len(rows), T).

    The per-prompt work is done once per prompt among the rows: the ViT output is reused from the
    rollout, and the prompt's pass through the LLM runs once, its KV cache shared by the rows that
    continue it (`model.RFTModel._score_continuations`); the per-completion work is then only the
    completion's own tokens. Both run with gradients. `reuse_vision=False` re-runs the ViT
    (needed when it is trained, or for a reference model whose ViT differs from the policy's).
    Special tokens are masked and logits divided by the temperature exactly as during sampling, so
    the scored distribution is the one that was sampled.
    """
    G = rollouts.completion_ids.shape[0] // len(rollouts.prompts)
    if rows != sorted(rows):
        raise ValueError("completion_logprobs needs rows in increasing order (grouped by prompt)")
    owners = [r // G for r in rows]
    distinct = sorted(set(owners))  # the prompts of these rows, each run once
    batch = stack_prompts([rollouts.prompts[b] for b in distinct], rollouts.pad_id)
    comp = rollouts.completion_ids[rows].to(batch["input_ids"].device)
    logits = net(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        image_grid_thw=batch["image_grid_thw"],
        vision=batch["vision"] if reuse_vision else None,
        pixel_values=None if reuse_vision else torch.cat([rollouts.prompts[b]["pixel_values"]
                                                          for b in distinct]),
        geometry=batch["geometry"],
        completion_ids=comp,
        copies=[owners.count(b) for b in distinct],
    )
    logp = token_logprobs(logits, comp, banned, temperature)
    # Padding after EOS is a banned token (log-prob -inf); it is masked out of the loss, and set
    # to 0 here so that 0 * -inf never turns the masked sum into NaN.
    mask = rollouts.completion_mask[rows].to(comp.device).bool()
    return logp.masked_fill(~mask, 0.0)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, banned: list[int], temperature: float,
                   rows_per_chunk: int = 1) -> torch.Tensor:
    """log softmax(logits / T)[target] per position, banned tokens masked: (rows, T) in fp32.

    The plain way, `log_softmax(logits.float() / T).gather(targets)`, builds full-vocabulary fp32
    copies of the logits for every row at once and keeps one for the backward pass: for a real
    vocabulary of 151,936 that is ~1.9 GB per copy for 8 rows x 400 tokens. Here each chunk of
    rows is done on its own under activation checkpointing: only the logits as the model made
    them (bf16 in a bf16 run) are kept for the backward pass, which recomputes the chunk's fp32
    softmax. The numbers are those of the plain way, bit for bit (the same operations per row;
    test_grpo's parity test). Example: logits [[[0, 0, ln 2]]] (1 row, 1 position, vocabulary 3),
    target 2, T = 1 -> log(2 / 4) = -0.693.
    """
    banned_ids = torch.tensor(banned, dtype=torch.long, device=logits.device)

    def chunk_logprobs(chunk: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        z = chunk.float().index_fill(-1, banned_ids, -float("inf"))  # never sampled, never scored
        logp = torch.log_softmax(z / temperature, dim=-1)
        return logp.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1)

    pieces = []
    for start in range(0, logits.shape[0], rows_per_chunk):
        chunk, chunk_targets = logits[start:start + rows_per_chunk], targets[start:start + rows_per_chunk]
        if torch.is_grad_enabled() and logits.requires_grad:
            pieces.append(checkpoint(chunk_logprobs, chunk, chunk_targets, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(chunk, chunk_targets))
    return torch.cat(pieces)


# =====================================================================================
# 4. The policy update: micro-chunks, gradient accumulation, DDP
# =====================================================================================


@dataclass
class Policy:
    """The model being trained, with what trains it and the frozen reference it is held near."""

    net: model_lib.RFTModel  # samples the rollouts (no gradients, nothing to synchronise)
    trained: torch.nn.Module  # the same net, in DDP under torchrun (itself if sharded): the update goes through it
    ref: model_lib.RFTModel | None  # the frozen initial policy of the KL term (None when beta = 0)
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # the trained parameters (the ViT is frozen unless --train-vision)


def micro_chunks(num_rows: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, num_rows))) for i in range(0, num_rows, size)]


def update_policy(policy: Policy, rollouts: Rollouts, normalizer: float, setup: Setup) -> dict:
    """One optimisation pass over the rollout batch; returns the loss statistics.

    `normalizer` is the loss's denominator over the *global* batch (completion tokens for
    token-mean, sequences for seq-mean). Each micro-chunk's loss is divided by it and multiplied
    by world_size, so DDP's gradient averaging yields exactly the gradient of the global loss (a
    sharded policy averages alike, reduce-scattering after every chunk's backward).
    """
    args, proc = setup.args, setup.proc
    policy.net.train()
    reuse_vision = not args.train_vision  # a frozen ViT's output from the rollout is still valid
    chunks = micro_chunks(rollouts.completion_ids.shape[0], args.micro_batch)
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "tokens": 0.0}
    for i, rows in enumerate(chunks):
        mask = rollouts.completion_mask[rows]
        ref_logp = None
        if args.beta != 0:
            # The frozen reference, or (LoRA) the policy itself with its adapters switched off.
            reference_off = model_lib.adapters_disabled(policy.net) if policy.ref is None else nullcontext()
            with torch.no_grad(), reference_off:
                ref_logp = completion_logprobs(policy.ref or policy.net, rollouts, rows, setup.banned,
                                               args.temperature, reuse_vision=reuse_vision).cpu()
        # DDP all-reduces the gradients on the last chunk's backward only (FSDP after each chunk)
        skip_sync = isinstance(policy.trained, DDP) and i < len(chunks) - 1
        with policy.trained.no_sync() if skip_sync else torch.enable_grad():
            logp = completion_logprobs(policy.trained, rollouts, rows, setup.banned, args.temperature,
                                       reuse_vision=reuse_vision).cpu()
            old = rollouts.old_logp[rows] if rollouts.old_logp is not None else logp.detach()
            loss, stats = grpo_loss(logp, old, ref_logp, rollouts.advantages[rows], mask, args.eps,
                                    args.eps_high, args.beta, args.loss_agg, normalizer=normalizer)
            (loss * proc.world_size).backward()
        totals["loss"] += loss.item()
        totals["kl"] += stats["kl"] * stats["tokens"]
        totals["clip_frac"] += stats["clip_frac"] * stats["tokens"]
        totals["tokens"] += stats["tokens"]
    # Sums over all processes, so every process takes the same decision below and logs agree.
    totals = {k: runtime.all_reduce_sum(v, proc) for k, v in totals.items()}
    if not math.isfinite(totals["loss"]):
        raise FloatingPointError(f"non-finite GRPO loss ({totals['loss']})")
    max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
    grad_norm = runtime.grad_norm_value(torch.nn.utils.clip_grad_norm_(policy.params, max_norm))
    if not torch.isfinite(grad_norm):
        raise FloatingPointError("non-finite gradient norm")
    policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    tokens = max(totals["tokens"], 1.0)
    return {"loss": totals["loss"], "kl": totals["kl"] / tokens, "clip_frac": totals["clip_frac"] / tokens,
            "grad_norm": float(grad_norm)}


def old_logprobs(net: model_lib.RFTModel, rollouts: Rollouts, setup: Setup) -> torch.Tensor:
    """Log-probs under the rollout policy, stored before the first of mu > 1 passes."""
    net.eval()
    rows_per_chunk = micro_chunks(rollouts.completion_ids.shape[0], setup.args.micro_batch)
    with torch.no_grad():
        return torch.cat([completion_logprobs(net, rollouts, rows, setup.banned, setup.args.temperature).cpu()
                          for rows in rows_per_chunk])


# =====================================================================================
# 5. The loop
# =====================================================================================


def gather(values: list, proc: runtime.Dist) -> list:
    """Concatenate per-process lists on every process (identity in one process)."""
    if not proc.enabled:
        return values
    out = [None] * proc.world_size
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def step_metrics(rollouts: Rollouts, proc: runtime.Dist, group_size: int) -> dict:
    """Rollout statistics over all processes: reward (total and per component), spread, lengths."""
    rewards_all = torch.tensor(gather(rollouts.rewards.tolist(), proc))
    grouped = rewards_all.view(-1, group_size)
    metrics = {
        "reward": float(rewards_all.mean()),
        "reward_std": float(grouped.std(1).mean()),
        "zero_std_frac": float((grouped.max(1).values == grouped.min(1).values).float().mean()),
        "completion_len": float(np.mean(gather(rollouts.completion_mask.sum(1).tolist(), proc))),
        "truncated": float(np.mean(gather(rollouts.truncated.float().tolist(), proc))),
    }
    for name, values in rollouts.components.items():
        metrics[f"reward/{name}"] = float(np.mean(gather(values.tolist(), proc)))
    return metrics


def prompt_seed(seed: int, step: int, index: int) -> int:
    """A sampling seed for one prompt of one step, independent of the process layout."""
    return int(np.random.default_rng([seed, step, index]).integers(2**31))


def load_policy(args, proc: runtime.Dist, resume_from: str, resume_state: dict | None = None):
    """Policy and frozen reference, with a one-line error for a missing or broken checkpoint.

    On resume the policy comes from the run's checkpoint and the reference stays the policy the
    run started from (`resume_state["args"]["init"]`), whatever --init says now. With beta = 0
    there is no reference; with LoRA the reference is the policy with its adapters switched off
    (`model.adapters_disabled`: one copy of the base weights); otherwise a second, frozen copy in
    the run's precision (bf16 for --dtype bfloat16). Both load with the same --geometry and
    --geometry-dim, so they fuse the same prior: auto keeps a merger --init has, off drops it, on
    with a size adds a zero-initialised one where --init has none (the policy's starts equal to
    the reference's: both add zeros).
    """
    source = resume_from if resume_state else args.init
    init = resume_state["args"]["init"] if resume_state else args.init
    for path in {source, init}:
        if path != "toy" and not os.path.isdir(path):
            hint = " (make it with: python sft.py)" if path == DEFAULT_INIT else ""
            raise SystemExit(f"error: initial policy not found: {path}{hint}")
    try:
        geometry, geometry_dim = runtime.geometry_arguments(args)
        net, tokenizer, image_cfg = model_lib.load_model(source, geometry=geometry, geometry_dim=geometry_dim,
                                                         dtype=runtime.weights_dtype(args))
        ref = None
        if args.beta != 0 and args.lora_rank == 0:
            ref_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
            ref = model_lib.load_reference(init, dtype=ref_dtype, geometry=geometry,
                                           geometry_dim=geometry_dim).to(proc.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    return net.to(proc.device), ref, tokenizer, runtime.pixel_budget(image_cfg, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    proc = runtime.setup_distributed(args.device)
    runtime.check_fsdp(args, proc)  # --fsdp needs torchrun's processes
    if args.prompts_per_step % proc.world_size:
        raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} must divide over "
                         f"{proc.world_size} processes")
    # Before anything loads: a folder holding a run is refused without --resume / --overwrite,
    # and a folder another run is writing to is refused outright (rank 0 locks it).
    runtime.claim_run_folder(args.out, args.resume, args.overwrite, proc)
    runtime.seed_everything(args.seed)
    try:
        records = runtime.load_run_records(args, args.task, args.split, args.limit, quiet=not proc.master)
    except (FileNotFoundError, ValueError) as e:  # data.RecordError is a ValueError
        raise SystemExit(f"error: {e}")
    latest = os.path.join(args.out, "latest")  # where checkpoints go
    resume_from = runtime.resolve_checkpoint(latest)  # `latest`, or `latest.old` after a cut rename
    resume_state = None
    if args.resume:
        # Checked before any model is loaded. --init is not used on resume (policy and reference
        # come from the checkpoint's run), and the parsed weights are compared instead of the
        # --reward text: "f1=1" and "f1=1.0" agree. A default budget is known once the policy is
        # loaded, and compared then.
        later = ("max_new_tokens",) if args.max_new_tokens is None else ()
        resume_state = runtime.read_training_state(resume_from, vars(args), also_free=("init", "reward", *later),
                                                   flag_of={"weights": "reward"})
    # The policy starts from the SFT checkpoint; the reference (for the KL term) is a frozen copy
    # of that same starting point. As in the paper, the ViT stays frozen: only the LLM and the
    # geometry merger learn.
    net, ref, tokenizer, image_cfg = load_policy(args, proc, resume_from, resume_state)
    if args.max_new_tokens is None:  # the task's budget for this model: the toy's or the published one
        args.max_new_tokens = default_budget(args, tokenizer)
        if resume_state:
            runtime.check_resume_args(resume_state.get("args", {}), {"max_new_tokens": args.max_new_tokens})
    try:  # every prompt must fit the context with its completion budget, and carry the prior the model fuses
        records = runtime.fit_lengths(records, tokenizer, image_cfg, runtime.max_seq_len(args, net),
                                      completion_tokens=args.max_new_tokens, skip_bad=args.skip_bad,
                                      quiet=not proc.master)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    # What trains: the LLM and the geometry merger (the paper), or LoRA adapters (--lora-rank).
    params = runtime.trainable_setup(net, args, args.train_vision)
    if args.fsdp:
        # FSDP2 shards the policy in place (see runtime.shard_model), and the frozen reference too;
        # the optimiser must see the sharded parameters, so it is built after this.
        params = runtime.shard_model(net, proc)
        if ref is not None:
            runtime.shard_model(ref, proc, trained=False)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    start_step = 0
    if resume_state:
        runtime.restore_training_state(resume_from, optimizer)
        start_step = resume_state["step"]
    # Sampling uses `net` directly (no gradients, nothing to synchronise); the update goes through
    # DDP so that gradients are averaged over processes (a sharded net averages them itself).
    policy = Policy(net, DDP(net) if proc.enabled and not args.fsdp else net, ref, optimizer, params)
    # Token ids that are neither sampled nor scored (special tokens, unused output rows).
    banned = model_lib.special_token_ids(tokenizer, net.lm.config.text_config.vocab_size)
    setup = Setup(args, tokenizer, image_cfg, banned, proc)

    logger, sample_logger = runtime.open_logs(args.out, ("metrics", "samples"), args.resume, start_step,
                                              proc.master)
    if proc.master:
        print(f"GRPO on {args.task}: {len(records)} prompts, G={args.group_size}, rewards {args.weights}, "
              f"beta={args.beta}, {proc.world_size} process(es), from step {start_step}")

    G = args.group_size
    end_step = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    bar = tqdm(range(start_step, end_step), disable=not proc.master or args.no_progress, desc="grpo",
               initial=start_step, total=args.steps)
    for step in bar:
        # A short linear warm-up, then a constant learning rate (the usual GRPO schedule).
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        for group in optimizer.param_groups:
            group["lr"] = lr
        # ---- 1. rollouts (this process's share of the step's prompts; whole groups only)
        # The step's prompts are a function of (seed, step), and each prompt's sampling seed a
        # function of (seed, step, prompt): any number of processes sees the same samples.
        t0 = time.time()
        step_prompts = runtime.step_indices(step, args.prompts_per_step, len(records), args.seed)
        my_positions = runtime.shard(list(range(args.prompts_per_step)), proc.rank, proc.world_size)
        my_records = [records[step_prompts[i]] for i in my_positions]
        seeds = [prompt_seed(args.seed, step, i) for i in my_positions]
        # bf16 autocast for --dtype bfloat16; a sharded policy is gathered whole for the rollout
        # (sampling does not go through its forward, where FSDP would gather it).
        with runtime.precision(args.dtype, proc.device), runtime.gathered(net):
            rollouts = rollout(net, my_records, seeds, setup)
        rollout_s = time.time() - t0
        # ---- 2. advantages: each completion against the others of its group (no value network)
        rollouts.advantages = group_advantages(rollouts.rewards, G, scale=args.scale_rewards == "group")
        # ---- 3. policy update(s)
        # The loss is a mean over the completion tokens (or sequences) of the *global* batch, so the
        # denominator is summed over processes before any micro-chunk is scored.
        t1 = time.time()
        mask = rollouts.completion_mask
        count = mask.sum() if args.loss_agg == "token-mean" else mask.shape[0]
        normalizer = runtime.all_reduce_sum(float(count), proc)
        # With several passes over one rollout batch the policy drifts from the one that sampled:
        # its log-probs are frozen first, so later passes measure the ratio r against them.
        if args.mu > 1:
            with runtime.precision(args.dtype, proc.device, sharded=args.fsdp):
                rollouts.old_logp = old_logprobs(net, rollouts, setup)
        try:
            for _ in range(args.mu):
                with runtime.precision(args.dtype, proc.device, sharded=args.fsdp):
                    update = update_policy(policy, rollouts, normalizer, setup)
        except FloatingPointError as e:
            raise SystemExit(f"error at step {step}: {e} (a learning rate too high, or NaN/inf in inputs, "
                             f"e.g. geometry features); nothing was saved for this step, "
                             f"{runtime.last_checkpoint_text(latest)}") from None
        update_s = time.time() - t1
        # ---- logging (rank 0): rollout statistics are gathered from every process
        metrics = step_metrics(rollouts, proc, G)
        generated = runtime.all_reduce_sum(float(mask.sum()), proc)
        if proc.master:
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{update['kl']:.4f}")
            if step % args.log_every == 0 or step == end_step - 1:
                logger.log({"step": step, "lr": lr, **metrics, **update, "rollout_s": round(rollout_s, 3),
                            "update_s": round(update_s, 3), "tokens_per_s": round(generated / rollout_s, 1)})
            if args.sample_every and step % args.sample_every == 0:
                # the first completion of each group, with its reward
                sample_logger.log({"step": step, "samples": [
                    {"id": rollouts.records[i // G].get("id"), "reward": float(rollouts.rewards[i]),
                     "text": rollouts.texts[i]} for i in range(0, len(rollouts.texts), G)]})
        # ---- periodic held-out evaluation (rank 0), then the checkpoint; as in sft.py, the
        # checkpoint comes second so that it covers the evaluation's log line.
        done = step + 1
        if args.eval_every and done % args.eval_every == 0:
            # A sharded policy is gathered whole on every process first; the others wait for rank 0.
            with runtime.whole_model(net, proc):
                if proc.master:
                    with runtime.precision(args.dtype, proc.device):
                        result = evaluation.evaluate(net, tokenizer, image_cfg, args.data, "val",
                                                     tasks=(args.task,), limit=args.eval_limit, progress=False,
                                                     record_options=runtime.record_options(args),
                                                     max_seq_len=runtime.max_seq_len(args, net))
                    logger.log({"step": step, "eval": result})
        if (args.save_every and done % args.save_every == 0) or done == end_step:
            state = {"step": done, "args": vars(args)}  # rank 0 writes; the others help gather (FSDP), then wait
            runtime.save_checkpoint(latest, net, tokenizer, image_cfg, optimizer, state, proc)
    bar.close()
    runtime.cleanup_distributed(proc)


if __name__ == "__main__":
    main(sys.argv[1:])
