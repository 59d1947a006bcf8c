"""One GRPO step, phase by phase: this project against TRL's GRPOTrainer on the same work.

Both sides train the same checkpoint (the real `Qwen2_5_VLForConditionalGeneration` class, built
by `tests/real_checkpoint.make_hub_checkpoint`: hub layout, Qwen's token ids, 151,936 output
rows) on the same prompts (the toy world's detection records: the same frames, the same prompt
tokens, checked id for id), with the same G, the same completion length (exactly N new tokens
on both sides: EOS is held back until N), the same reward (R_format, `rewards.format_reward`),
beta > 0 (so both run a reference pass), one optimisation pass per rollout batch, the same
micro-batch, learning rate, AdamW, gradient clipping and seed. Each side runs in a subprocess of
its own, so that each peak memory (ru_maxrss) is its own; TRL's in the venv of
requirements-bench.txt (TRL is never installed into the project's venv).

Phases of one step (wall time, median over --steps after --warmup discarded steps):
    rollout     sampling G completions per prompt, reading and preparing the frames included
    rewards     scoring the decoded completions
    policy      the policy's log-probs with gradients, the loss and the backward pass
    reference   the frozen reference's log-probs (no gradients)
    optimiser   gradient clipping, AdamW step, zero_grad
    other       the rest of the step (advantages, bookkeeping; for TRL also its second pass of the
                image processor and the batch splitting)
The project's phases are timed by wrapping `grpo.rollout`, `grpo.score`, `grpo.update_policy`,
`grpo.completion_logprobs` (reference = its calls without gradients) and the optimiser; TRL's
by wrapping `GRPOTrainer.get_batch_samples` + `_generate` (rollout), `_calculate_rewards`,
`_get_per_token_logps_and_entropies` called with the reference model, `training_step` minus
`_prepare_inputs` (policy), and the time from the last `training_step` to `on_step_end`
(optimiser).

TRL runs twice. As it comes: on a CPU (no Triton) its fused LM head projects every position of
prompt + completion onto the vocabulary and keeps the completion's. And with that one choice
switched to what it does on CUDA/XPU with Triton (only the completion positions are projected),
so that the comparison does not rest on a CPU-only cost of TRL; its tile arithmetic stays its
torch fallback.

The project is also timed with each once-per-group optimisation of docs/DESIGN.md section 7
("The per-group work, done once") switched off, to show what each buys. grpo.py has no switch
for them, so the switched-off variants are written here from lower-level pieces:
    vit      the ViT runs for every completion row (G times per prompt) in the rollout and in
             both scoring passes, as TRL does; the LLM work is unchanged
    prefill  sampling prefills every row: `RFTModel.generate` on the step's prompts each
             repeated G times, instead of `RFTModel.prefill` once per prompt + cache copies
    scoring  each row is scored by its own full forward pass (prompt + completion, rows of a
             micro-chunk batched), instead of the shared prompt pass of `_score_continuations`
    all      the three together: the project's code doing TRL's amount of work

The development machine is a shared 2-core one whose load from other jobs swings between 1 and 6
within minutes, so the workers of a comparison are loaded side by side and take their steps in
turn (round k: step k of each; `run_group`): a burst of load hits all sides alike. They run one
torch thread each by default (--threads): a 2-thread OpenMP process competing with other
processes waits at every parallel region (2-4x slower steps, mostly in decoding); `--threads 0`
gives torch's default. The load average is printed with the figures.

Run:
    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
    .venv/bin/python bench.py                       (10-12 minutes on the 2 cores, with the load)
    .venv/bin/python bench.py --no-trl              (the project and its variants only, ~4 minutes)
    .venv/bin/python bench.py --layers 4 --hidden 512 --vision-layers 4 --vision-hidden 256 \
        --size 224 --frames 8 --variants all --no-trl-stock --steps 3    (longer prompts, ~7 minutes)
    .venv/bin/python bench.py --profile 25 --variants "" --no-trl    (where the project's time goes)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)

PHASES = ("rollout", "rewards", "policy", "reference", "optimiser", "other")
VARIANTS = {  # name -> (vit once, prefill once, shared-prefix scoring), see the docstring
    "default": (True, True, True),
    "vit": (False, True, True),
    "prefill": (True, False, True),
    "scoring": (True, True, False),
    "all": (False, False, False),
}
VARIANT_TITLES = {
    "default": "default (all three once per group)",
    "vit": "ViT per row",
    "prefill": "prefill per row",
    "scoring": "scoring per row (no shared prompt pass)",
    "all": "all three per row (TRL's amount of work)",
}
RESULT_TAG, READY_TAG, DONE_TAG = "BENCH_RESULT ", "BENCH_READY", "BENCH_DONE"
# The chat template the TRL side's processor renders: the project's prompt (data.prompt_text), an
# image part becoming <|vision_start|><|image_pad|><|vision_end|> that the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=5, help="timed steps (medians over these)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step")
    p.add_argument("--group-size", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="completion length, exactly (EOS held back)")
    p.add_argument("--frames", type=int, default=4, help="frames per prompt (the toy detection records have 4)")
    p.add_argument("--size", type=int, default=112, help="frames resized to size x size (112: the toy world's)")
    p.add_argument("--layers", type=int, default=2, help="LLM layers of the checkpoint")
    p.add_argument("--hidden", type=int, default=256, help="LLM width of the checkpoint")
    p.add_argument("--vision-layers", type=int, default=2, help="ViT blocks of the checkpoint")
    p.add_argument("--vision-hidden", type=int, default=64, help="ViT width of the checkpoint")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward, both sides")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: both run a reference pass)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate (constant)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per worker process (0 = torch's default, all cores). 1 by default: on a "
                        "shared 2-core machine other processes take cores, and an OpenMP process of 2 threads then "
                        "waits at every parallel region (measured: 2-4x slower steps, mostly in decoding)")
    p.add_argument("--variants", default="vit,prefill,scoring,all",
                   help="project variants with a once-per-group switch off ('' = none)")
    p.add_argument("--no-trl", action="store_true", help="skip TRL (the project and its variants only)")
    p.add_argument("--no-trl-stock", action="store_true", help="skip TRL as it comes (the slow run on a CPU)")
    p.add_argument("--no-trl-compact", action="store_true",
                   help="skip the second TRL run, which scores only the completion positions in its LM head (as TRL "
                        "does on CUDA/XPU with Triton; on the CPU it scores every prompt position too)")
    p.add_argument("--trl-python", default=os.path.join(ROOT, ".venv-bench", "bin", "python"),
                   help="the python of the venv holding requirements-bench.txt")
    p.add_argument("--work", default=None, help="folder for the data and checkpoint (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write every number to this file")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print each worker's N most expensive functions (cProfile, whole worker)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: project:<variant> or trl
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)  # internal: JSON of the run
    args = p.parse_args(argv)
    if args.prompts * args.group_size % args.micro_batch:
        p.error("--micro-batch must divide prompts x group size (TRL's batches must tile the rollout batch)")
    for name in filter(None, args.variants.split(",")):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; known: {', '.join(v for v in VARIANTS if v != 'default')}")
    return args


# =====================================================================================
# The work: records and a checkpoint, made once and shared by every worker
# =====================================================================================


def make_work(args, work: str) -> dict:
    """Toy-world detection records (frames resized, geometry dropped) and a hub-layout checkpoint."""
    from PIL import Image

    import data
    from tests.real_checkpoint import make_hub_checkpoint

    scenes_dir = os.path.join(work, "scenes")
    needed = args.prompts * (args.warmup + args.steps)
    num_scenes = max(4, -(-needed // 3))  # 3 detection records per scene
    if not os.path.exists(os.path.join(scenes_dir, "train", "detection.jsonl")):
        subprocess.run([sys.executable, os.path.join(ROOT, "scenes.py"), "--out", scenes_dir, "--train-scenes",
                        str(num_scenes), "--val-scenes", "1", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    source = data.load_records(os.path.join(scenes_dir, "train"), "detection")
    out_dir = os.path.join(work, "data", "train")
    os.makedirs(os.path.join(out_dir, "frames"), exist_ok=True)
    lines = []
    for r, record in enumerate(source):
        paths = [data.resolve(record, p) for p in record["images"]]
        if args.frames != len(paths):  # other frame counts: uniform over the scene's camera path
            scene_frames = data.list_frame_files(os.path.dirname(paths[0]))
            picks = data.sample_frame_indices(len(scene_frames), args.frames, "uniform")
            paths = [scene_frames[i] for i in picks]
        images = []
        for f, path in enumerate(paths):
            name = f"frames/{r:04d}_{f:02d}.png"
            image = Image.open(path).convert("RGB")
            if image.size != (args.size, args.size):
                image = image.resize((args.size, args.size), Image.BICUBIC)
            image.save(os.path.join(out_dir, name))
            images.append(name)
        # No geometry: the checkpoint has no geometry merger, and TRL could not take the prior.
        lines.append(json.dumps({
            "id": record["id"], "task": "detection", "images": images, "boxes": record["boxes"],
            "conversations": [{"from": "human", "value": data.detection_prompt(len(images))},
                              record["conversations"][1]]}))
    with open(os.path.join(out_dir, "detection.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    checkpoint = os.path.join(work, "checkpoint")
    if not os.path.exists(os.path.join(checkpoint, "config.json")):
        make_hub_checkpoint(checkpoint, layers=args.layers, hidden=args.hidden, vision_layers=args.vision_layers,
                            vision_hidden=args.vision_hidden, seed=args.seed)
    return {"data": os.path.join(work, "data"), "checkpoint": checkpoint}


def step_records(records: list, prompts: int, step: int) -> list:
    """The prompts of a step, the same on both sides: records taken in order, cycling."""
    return [records[(step * prompts + i) % len(records)] for i in range(prompts)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Gate:
    """Steps in lockstep with the other workers of a group: one step each in turn (see run_group).

    A worker says READY once loaded, then before each step waits for the driver's "go" on stdin
    and after it says DONE. Without a driver (cfg["lockstep"] false, e.g. in tests) it does nothing.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if enabled:
            print(READY_TAG, flush=True)

    def wait(self) -> None:
        if self.enabled and not sys.stdin.readline():
            raise SystemExit("bench driver went away")

    def done(self) -> None:
        if self.enabled:
            print(DONE_TAG, flush=True)


# =====================================================================================
# The project's step, with the once-per-group switches written from lower-level pieces
# =====================================================================================


def per_row_logprobs(net, rollouts, rows, banned, temperature, reuse_vision=True):
    """`grpo.completion_logprobs` without the shared prompt pass: every row its own full sequence.

    The rows of a micro-chunk go through the model as one batch of (prompt + completion)
    sequences, each prompt repeated for each of its rows (what TRL does); position P-1+t's logits
    score completion token t. With reuse_vision=False the ViT runs for every row.
    """
    import torch
    import torch.nn.functional as F

    import grpo

    G = rollouts.completion_ids.shape[0] // len(rollouts.prompts)
    owners = [r // G for r in rows]
    batch = grpo.stack_prompts([rollouts.prompts[b] for b in owners], rollouts.pad_id)
    comp = rollouts.completion_ids[rows].to(batch["input_ids"].device)
    T = comp.shape[1]
    pixel_values = None if reuse_vision else torch.cat([rollouts.prompts[b]["pixel_values"] for b in owners])
    logits = net(
        input_ids=torch.cat([batch["input_ids"], comp], 1)[:, :-1],
        attention_mask=F.pad(batch["attention_mask"], (0, T - 1), value=1),
        mm_token_type_ids=F.pad(batch["mm_token_type_ids"], (0, T - 1)),
        image_grid_thw=batch["image_grid_thw"],
        vision=batch["vision"] if reuse_vision else None,
        pixel_values=pixel_values,
        geometry=batch["geometry"],
        logits_to_keep=T,
    )
    logp = grpo.token_logprobs(logits, comp, banned, temperature)
    return logp.masked_fill(~rollouts.completion_mask[rows].to(comp.device).bool(), 0.0)


def install_variant(variant: str, group_size: int, timers: dict):
    """Switch off the once-per-group pieces of `variant` and wrap the phases with timers.

    Patches grpo's module-level functions (grpo.rollout and grpo.update_policy look them up at
    call time) and torch's clip_grad_norm_; returns a function that puts them all back, and the
    unpatched `grpo.completion_logprobs` (the shared prompt pass, for the parity check).
    """
    import torch

    import grpo

    vit_once, prefill_once, shared_scoring = VARIANTS[variant]
    original = {name: getattr(grpo, name) for name in
                ("prepare_prompt", "sample_groups", "completion_logprobs", "score", "rollout", "update_policy")}

    def prepare_prompt_vit_per_row(net, record, setup):
        # The ViT over every row's copy of the frames (G copies); the copies' outputs are equal.
        batch = original["prepare_prompt"](net, record, setup)
        with torch.no_grad():
            net.vision_tokens(batch["pixel_values"].repeat(group_size - 1, 1),
                              batch["image_grid_thw"].repeat(group_size - 1, 1))
        return batch

    def sample_groups_per_row(net, prompts, seeds, setup):
        # Each prompt repeated G times and prefilled G times: plain `RFTModel.generate`.
        import numpy as np
        args = setup.args
        batch = grpo.stack_prompts([p for p in prompts for _ in range(args.group_size)], setup.tokenizer.pad_token_id)
        embeds = net.fuse_geometry(batch["vision"], batch["image_grid_thw"], batch["geometry"])
        row_seeds = [int(np.random.default_rng([s, g]).integers(2**63)) for s in seeds for g in range(args.group_size)]
        return net.generate(batch, embeds, do_sample=False, max_new_tokens=args.max_new_tokens,
                            suppress_tokens=setup.banned, logits_processor=[grpo.row_sampler(row_seeds, args.temperature)])

    def logprobs(net, rollouts, rows, banned, temperature, reuse_vision=True):
        start = time.perf_counter()
        if not shared_scoring:
            out = per_row_logprobs(net, rollouts, rows, banned, temperature, reuse_vision=reuse_vision and vit_once)
        else:
            if not vit_once:  # the ViT per row, then the shared prompt pass as usual
                owners = [r // group_size for r in rows]
                with torch.no_grad():
                    for b in sorted(set(owners)):
                        p = rollouts.prompts[b]
                        net.vision_tokens(p["pixel_values"].repeat(owners.count(b), 1),
                                          p["image_grid_thw"].repeat(owners.count(b), 1))
            out = original["completion_logprobs"](net, rollouts, rows, banned, temperature, reuse_vision=reuse_vision)
        if not torch.is_grad_enabled():
            timers["reference"] += time.perf_counter() - start
        return out

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.perf_counter() - start
        return wrapper

    clip = torch.nn.utils.clip_grad_norm_
    if not vit_once:
        grpo.prepare_prompt = prepare_prompt_vit_per_row
    if not prefill_once:
        grpo.sample_groups = sample_groups_per_row
    grpo.completion_logprobs = logprobs
    grpo.score = timed("rewards", original["score"])
    grpo.rollout = timed("rollout_total", original["rollout"])
    grpo.update_policy = timed("update_total", original["update_policy"])
    torch.nn.utils.clip_grad_norm_ = timed("optimiser", clip)

    def undo() -> None:
        for name, fn in original.items():
            setattr(grpo, name, fn)
        torch.nn.utils.clip_grad_norm_ = clip
    return undo, original["completion_logprobs"]


def project_worker(cfg: dict, variant: str) -> dict:
    """Load the project's policy and reference as grpo.py does and time its steps."""
    import torch

    import grpo
    import model as model_lib
    import runtime

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    args = grpo.parse_args([
        "--init", cfg["checkpoint"], "--data", cfg["data"], "--task", "detection", "--reward", "format=1",
        "--group-size", str(cfg["group_size"]), "--max-new-tokens", str(cfg["new_tokens"]),
        "--beta", str(cfg["beta"]), "--lr", str(cfg["lr"]), "--micro-batch", str(cfg["micro_batch"]),
        "--temperature", str(cfg["temperature"]), "--seed", str(cfg["seed"]), "--warmup", "0",
        "--device", "cpu", "--no-progress"])
    proc = runtime.setup_distributed("cpu")
    runtime.seed_everything(args.seed)
    records = runtime.load_run_records(args, "detection", "train")
    net, ref, tokenizer, image_cfg = grpo.load_policy(args, proc, args.init)
    params = runtime.trainable_setup(net, args, args.train_vision)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    policy = grpo.Policy(net, net, ref, optimizer, params)
    banned = model_lib.special_token_ids(tokenizer, net.lm.config.text_config.vocab_size)
    setup = grpo.Setup(args, tokenizer, image_cfg, banned, proc)
    # Exactly N new tokens: the end-of-answer token is held back until then (generate's min_new_tokens).
    net.lm.generation_config.min_new_tokens = args.max_new_tokens

    timers: dict = defaultdict(float)
    undo, shared_logprobs = install_variant(variant, args.group_size, timers)
    try:
        return timed_steps(cfg, args, records, net, policy, setup, timers, shared_logprobs)
    finally:
        undo()


def timed_steps(cfg, args, records, net, policy, setup, timers, shared_logprobs) -> dict:
    import torch

    import grpo

    optimizer, banned, params = policy.optimizer, setup.banned, policy.params
    for name in ("step", "zero_grad"):
        original = getattr(optimizer, name)

        def timed_method(*a, _fn=original, **k):
            start = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                timers["optimiser"] += time.perf_counter() - start
        setattr(optimizer, name, timed_method)

    steps, info = [], {}
    G = args.group_size
    gate = Gate(cfg.get("lockstep", False))
    for step in range(cfg["warmup"] + cfg["steps"]):
        gate.wait()
        timers.clear()
        my_records = step_records(records, cfg["prompts"], step)
        seeds = [grpo.prompt_seed(args.seed, step, i) for i in range(len(my_records))]
        start = time.perf_counter()
        rollouts = grpo.rollout(net, my_records, seeds, setup)
        rollouts.advantages = grpo.group_advantages(rollouts.rewards, G, scale=args.scale_rewards == "group")
        normalizer = float(rollouts.completion_mask.sum())  # token-mean over the whole rollout batch
        grpo.update_policy(policy, rollouts, normalizer, setup)
        total = time.perf_counter() - start
        t = dict(timers)
        phases = {
            "rollout": t["rollout_total"] - t.get("rewards", 0.0),
            "rewards": t.get("rewards", 0.0),
            "reference": t.get("reference", 0.0),
            "optimiser": t.get("optimiser", 0.0),
        }
        phases["policy"] = t["update_total"] - phases["reference"] - phases["optimiser"]
        phases["other"] = total - t["rollout_total"] - t["update_total"]
        phases["step"] = total
        steps.append(phases)
        gate.done()
        if step == 0:
            lengths = rollouts.completion_mask.sum(1)
            info = {"prompt_tokens": [int(p["input_ids"].shape[1]) for p in rollouts.prompts],
                    "completion_tokens": [int(lengths.min()), int(lengths.max())],
                    "visual_tokens_per_prompt": int(rollouts.prompts[0]["vision"].shape[0]),
                    "rows": int(rollouts.completion_ids.shape[0]),
                    "trained_parameters": sum(p.numel() for p in params)}
            with torch.no_grad():  # the variants' per-row scoring against the shared prompt pass
                rows = list(range(min(args.micro_batch, len(rollouts.texts))))
                shared = shared_logprobs(net, rollouts, rows, banned, args.temperature)
                plain = per_row_logprobs(net, rollouts, rows, banned, args.temperature, reuse_vision=False)
            info["per_row_vs_shared_max_abs_logp_diff"] = float((shared - plain).abs().max())
    return {"steps": steps, "info": info, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


# =====================================================================================
# TRL's GRPOTrainer on the same work
# =====================================================================================


def trl_processor(tokenizer, image_cfg):
    """A Qwen2_5_VLProcessor without its constructor (which needs the torchvision video processor).

    It gets the torchvision-free image processor, the project's tokenizer, a chat template that
    renders the project's prompt, and the image / video token names and ids.
    """
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = object.__new__(Qwen2_5_VLProcessor)
    processor.image_processor = Qwen2VLImageProcessorPil(
        min_pixels=image_cfg.min_pixels, max_pixels=image_cfg.max_pixels, patch_size=image_cfg.patch_size,
        temporal_patch_size=image_cfg.temporal_patch_size, merge_size=image_cfg.merge_size,
        image_mean=list(image_cfg.image_mean), image_std=list(image_cfg.image_std))
    processor.tokenizer = tokenizer
    processor.chat_template = CHAT_TEMPLATE
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    return processor


def trl_worker(cfg: dict, compact: bool = False) -> dict:
    """TRL's GRPOTrainer on the same checkpoint, prompts, frames and settings; its phases timed.

    compact=True makes TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) take the branch
    it takes on Triton devices: only the completion positions go through the LM head. On the CPU
    it otherwise projects every position of prompt + completion onto the 151,936-row vocabulary
    and discards the prompt's; the tile arithmetic stays TRL's torch fallback either way.
    """
    import types

    import datasets
    import torch
    import trl
    from PIL import Image
    from transformers import TrainerCallback

    import data
    import model as model_lib
    import rewards
    import runtime

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if compact:
        import trl.trainer.utils
        trl.trainer.utils._use_triton = lambda device: True  # only the `compact` choice reads this name there
    path, G, N = cfg["checkpoint"], cfg["group_size"], cfg["new_tokens"]
    lm = model_lib.load_hf_model(path, torch.float32)  # the project's checks; the same HF class
    for name, p in lm.named_parameters():  # the ViT frozen, as in the project (and the paper)
        p.requires_grad = ".visual." not in f".{name}"
    tokenizer = model_lib.load_tokenizer(path, lm.config.text_config.vocab_size)
    image_cfg = runtime.pixel_budget(model_lib.image_config_from_dir(path, lm.config),
                                     types.SimpleNamespace(max_pixels=None, min_pixels=None))
    banned = model_lib.special_token_ids(tokenizer, lm.config.text_config.vocab_size)
    records = data.load_records(os.path.join(cfg["data"], "train"), "detection")
    total_steps = cfg["warmup"] + cfg["steps"]
    order = [r for s in range(total_steps) for r in step_records(records, cfg["prompts"], s)]
    rows = [{"prompt": [{"role": "user", "content": rec["conversations"][0]["value"].replace(data.IMAGE_PLACEHOLDER, "")}],
             "images": [Image.fromarray(a) for a in data.record_frames(rec)], "record": i}
            for i, rec in enumerate(order)]
    dataset = datasets.Dataset.from_list(rows)

    def format_reward(prompts, completions, record, **_):
        # The project's reward code on the decoded completion (the same as grpo.score does).
        return [rewards.total_reward(c[0]["content"], order[i], {"format": 1.0})[0] for c, i in zip(completions, record)]

    micro = cfg["micro_batch"]
    config = trl.GRPOConfig(
        output_dir=os.path.join(cfg["work"], "trl_out"), use_cpu=True, bf16=False, fp16=False, seed=cfg["seed"],
        # batch layout: B prompts x G rows per step, in micro-batches of `micro` rows, one pass
        per_device_train_batch_size=micro, gradient_accumulation_steps=cfg["prompts"] * G // micro,
        num_generations=G, num_iterations=1, shuffle_dataset=False, max_steps=total_steps,
        # sampling: full-vocabulary at the temperature, exactly N tokens, the project's banned ids
        max_completion_length=N, temperature=cfg["temperature"], top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, use_vllm=False,
        generation_kwargs={"min_new_tokens": N, "suppress_tokens": banned},
        # the loss: clipped ratio, k3 KL to the reference, token mean over the rollout batch
        beta=cfg["beta"], epsilon=0.2, loss_type="dapo", scale_rewards="group", use_bias_correction_kl=False,
        mask_truncated_completions=False, top_entropy_quantile=1.0,
        # the optimiser: AdamW (0.9, 0.99), constant lr, clip 1, no gradient checkpointing
        learning_rate=cfg["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, disable_dropout=True,
        # no logging, saving or evaluation inside the timed loop
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0, remove_unused_columns=False,
    )
    trainer = trl.GRPOTrainer(model=lm, reward_funcs=[format_reward], args=config, train_dataset=dataset,
                              processing_class=trl_processor(tokenizer, image_cfg))

    cur: dict = defaultdict(float)
    steps: list[dict] = []
    info: dict = {}

    def timed(name, fn, first_start=False):
        def wrapper(*a, **k):
            start = time.perf_counter()
            if first_start and "t_start" not in cur:
                cur["t_start"] = start
            try:
                return fn(*a, **k)
            finally:
                cur[name] += time.perf_counter() - start
        return wrapper

    def logps(model, *a, **k):
        start = time.perf_counter()
        try:
            return original_logps(model, *a, **k)
        finally:
            cur["reference" if model is trainer.ref_model else "policy_forward"] += time.perf_counter() - start

    def generate(prompts):
        out = original_generate(prompts)
        if not info:
            prompt_ids, completion_ids = out[0], out[1]
            lengths = [len(c) for c in completion_ids]
            # the project's prompt tokens for the same records (data.collate), id for id
            expected = [data.collate([order[i]], tokenizer, image_cfg, with_answer=False)["input_ids"][0].tolist()
                        for i in range(cfg["prompts"])]
            info.update({"prompt_tokens": [len(p) for p in prompt_ids[::G]],
                         "completion_tokens": [min(lengths), max(lengths)], "rows": len(completion_ids),
                         "prompt_ids_equal_project": [list(p) for p in prompt_ids[::G]] == expected})
        return out

    def training_step(*a, **k):
        out = original_training_step(*a, **k)
        cur["t_last_train_end"] = time.perf_counter()
        return out

    original_logps = trainer._get_per_token_logps_and_entropies
    original_generate = trainer._generate
    original_training_step = timed("training_step", trainer.training_step)
    trainer._get_per_token_logps_and_entropies = logps
    trainer._generate = timed("generate", generate)
    gate = Gate(cfg.get("lockstep", False))
    batch_samples = timed("data", trainer.get_batch_samples, first_start=True)

    def get_batch_samples(*a, **k):  # the step starts here: wait for this worker's turn first
        gate.wait()
        return batch_samples(*a, **k)
    trainer.get_batch_samples = get_batch_samples
    trainer._calculate_rewards = timed("rewards", trainer._calculate_rewards)
    trainer._prepare_inputs = timed("prepare_inputs", trainer._prepare_inputs)
    trainer.training_step = training_step

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            nonlocal cur
            end = time.perf_counter()
            t = dict(cur)
            phases = {"rollout": t["data"] + t["generate"], "rewards": t["rewards"], "reference": t["reference"],
                      "policy": t["training_step"] - t["prepare_inputs"], "optimiser": end - t["t_last_train_end"],
                      "step": end - t["t_start"]}
            phases["other"] = phases["step"] - sum(phases[k] for k in PHASES if k != "other")
            steps.append(phases)
            cur = defaultdict(float)
            gate.done()

    trainer.add_callback(StepEnd())
    trainer.train()
    info["trained_parameters"] = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    info["trl_version"] = trl.__version__
    return {"steps": steps, "info": info, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


# =====================================================================================
# The driver: one subprocess per side and variant, then the tables
# =====================================================================================


def run_group(specs: list, cfg: dict, total_steps: int) -> dict:
    """Run workers side by side, one step each in turn, so that they share the machine's load.

    specs: (key, python, worker name). Every worker loads at once, then the driver lets them
    take their steps in rounds (round k: step k of each worker, one after another, the order
    rotated every round), so a burst of load from elsewhere hits all of them alike instead of
    whichever ran at that minute. Each is its own process: its peak memory is its own.
    """
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    procs, logs = {}, {}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_logs_") as log_dir:
        try:
            for key, python, worker in specs:
                logs[key] = open(os.path.join(log_dir, worker.replace(":", "_") + ".log"), "w+")
                cmd = [python, os.path.abspath(__file__), "--worker", worker,
                       "--config", json.dumps({**cfg, "lockstep": True})]
                procs[key] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[key],
                                              text=True, bufsize=1, env=env, cwd=ROOT)

            def wait_for(key: str, tag: str) -> str:
                for line in procs[key].stdout:
                    if line.startswith(tag):
                        return line
                procs[key].wait()
                logs[key].seek(0)
                tail = "\n".join(logs[key].read().strip().splitlines()[-15:])
                raise RuntimeError(f"{key} failed (exit {procs[key].returncode}):\n{tail}")

            for key in procs:
                wait_for(key, READY_TAG)
            keys = list(procs)
            for step in range(total_steps):
                for key in keys[step % len(keys):] + keys[:step % len(keys)]:
                    procs[key].stdin.write("go\n")
                    procs[key].stdin.flush()
                    wait_for(key, DONE_TAG)
            results = {}
            for key in keys:
                results[key] = json.loads(wait_for(key, RESULT_TAG)[len(RESULT_TAG):])
                procs[key].wait()
                results[key]["load"] = [load_start, os.getloadavg()[0]]
            return results
        finally:
            for key, proc in procs.items():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                logs[key].close()


def medians(result: dict, warmup: int) -> dict:
    timed = result["steps"][warmup:]
    return {k: statistics.median(s[k] for s in timed) for k in (*PHASES, "step")}


def fmt(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.095 else f"{seconds * 1000:.0f} ms"


def print_tables(args, results: dict, load_before, load_after) -> None:
    default = results["project:default"]
    project = medians(default, args.warmup)
    info = default["info"]
    threads = default["threads"]
    print(f"\nOne GRPO step: {args.prompts} prompt(s) x G={args.group_size}, {args.frames} frames of "
          f"{args.size}x{args.size} per prompt ({info['visual_tokens_per_prompt']} visual tokens; prompts of "
          f"{min(info['prompt_tokens'])}-{max(info['prompt_tokens'])} tokens), exactly {args.new_tokens} new tokens, "
          f"micro-batch {args.micro_batch}, beta {args.beta}; checkpoint {args.layers} layers x {args.hidden}, ViT "
          f"{args.vision_layers} x {args.vision_hidden}, vocabulary 151,936, fp32; {threads} torch thread(s) per "
          f"process. Medians over {args.steps} steps after {args.warmup} warm-up.\n")
    sides = [("project", default)] + [(name, results[key]) for key, name in
                                      (("trl", "TRL GRPOTrainer"), ("trl:compact", "TRL, LM head on completions only"))
                                      if key in results]
    if len(sides) > 1:
        m = {name: medians(r, args.warmup) for name, r in sides}
        trl_names = [name for name, _ in sides[1:]]
        print("| phase | " + " | ".join(name for name, _ in sides) + " | "
              + " | ".join(f"project / {name}" for name in trl_names) + " |")
        print("| --- |" + " ---: |" * (2 * len(sides) - 1))
        for k in (*PHASES, "step"):
            cells = [fmt(m[name][k]) for name, _ in sides]
            ratios = [f"{project[k] / m[name][k]:.2f}" if m[name][k] > 0.005 else "-" for name in trl_names]
            print(f"| {'**step** (median)' if k == 'step' else k} | " + " | ".join(cells + ratios) + " |")
        fastest = {name: min(s["step"] for s in r["steps"][args.warmup:]) for name, r in sides}
        print("| fastest step | " + " | ".join(fmt(fastest[name]) for name, _ in sides) + " | "
              + " | ".join(f"{fastest['project'] / fastest[name]:.2f}" for name in trl_names) + " |")
        rss = {name: r["peak_rss_mb"] for name, r in sides}
        print("| peak memory (ru_maxrss) | " + " | ".join(f"{rss[name]:.0f} MiB" for name, _ in sides) + " | "
              + " | ".join(f"{rss['project'] / rss[name]:.2f}" for name in trl_names) + " |")
        t_info = sides[1][1]["info"]
        print(f"\nTRL {t_info['trl_version']}: prompt token ids equal to the project's: "
              f"{t_info['prompt_ids_equal_project']}; completion tokens per row {t_info['completion_tokens']} "
              f"(project {info['completion_tokens']}); trained parameters {t_info['trained_parameters']:,} "
              f"(project {info['trained_parameters']:,}).")
    print("\nThe project with each once-per-group optimisation switched off (docs/DESIGN.md section 7; "
          "these workers stepped in turn with a second run of the default):\n")
    print("| project variant | step | rollout | policy | reference | peak memory | step / default |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = results.get("project:default (variants group)", default)
    for name in ["default", *filter(None, args.variants.split(","))]:
        r = base if name == "default" else results[f"project:{name}"]
        v = medians(r, args.warmup)
        print(f"| {VARIANT_TITLES[name]} | {fmt(v['step'])} | {fmt(v['rollout'])} | {fmt(v['policy'])} | "
              f"{fmt(v['reference'])} | {r['peak_rss_mb']:.0f} MiB | "
              f"{v['step'] / medians(base, args.warmup)['step']:.2f} |")
    print(f"\nPer-row scoring against the shared prompt pass: max |log p difference| "
          f"{info['per_row_vs_shared_max_abs_logp_diff']:.1e}.")
    print("Every step (s), warm-up first, and the load average (1 min) when each group started and ended:")
    for k, r in results.items():
        print(f"  {k}: " + ", ".join(f"{s['step']:.2f}" for s in r["steps"])
              + f"  (load {r['load'][0]:.2f} -> {r['load'][1]:.2f})")
    print(f"Load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
          f"{', '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs.")
    for key, name in (("trl", "TRL's"), ("trl:compact", "TRL's with the LM head on completions only")):
        if key in results:
            trl = medians(results[key], args.warmup)
            verdict = "met" if project["step"] <= trl["step"] / 2 else "NOT met"
            print(f"Project median step <= half of {name}: {verdict} "
                  f"({project['step']:.2f} s vs {trl['step']:.2f} s, ratio {project['step'] / trl['step']:.2f}).")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:  # a subprocess: one side (or variant) of the benchmark
        cfg = json.loads(args.config)
        profiler = None
        if cfg.get("profile"):
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        if args.worker.startswith("trl"):
            result = trl_worker(cfg, compact=args.worker == "trl:compact")
        else:
            result = project_worker(cfg, args.worker.split(":", 1)[1])
        if profiler:
            import io
            import pstats
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(cfg["profile"])
            result["profile"] = text.getvalue()
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    if not args.no_trl and not os.path.exists(args.trl_python):
        raise SystemExit(f"error: {args.trl_python} not found; make the benchmark venv:\n  python3 -m venv "
                         f".venv-bench && .venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt\n"
                         f"(or pass --no-trl)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        work = args.work or tmp
        os.makedirs(work, exist_ok=True)
        started = time.time()
        paths = make_work(args, work)
        cfg = {**paths, "work": work, "prompts": args.prompts, "group_size": args.group_size,
               "new_tokens": args.new_tokens, "micro_batch": args.micro_batch, "beta": args.beta, "lr": args.lr,
               "temperature": args.temperature, "seed": args.seed, "steps": args.steps, "warmup": args.warmup,
               "threads": args.threads, "profile": args.profile}
        total = args.warmup + args.steps
        # Group 1: the project against TRL. Group 2: the project's variants (with the default
        # again, so that each group's ratios come from steps taken side by side).
        comparison = [("project:default", sys.executable, "project:default")]
        if not args.no_trl and not args.no_trl_stock:
            comparison.append(("trl", args.trl_python, "trl"))
        if not args.no_trl and not args.no_trl_compact:
            comparison.append(("trl:compact", args.trl_python, "trl:compact"))
        print(f"{' / '.join(k for k, _, _ in comparison)}: {total} steps each, in turn ...", flush=True)
        results = run_group(comparison, cfg, total)
        variants = [f"project:{name}" for name in filter(None, args.variants.split(","))]
        if variants:
            print(f"project:default / {' / '.join(variants)}: {total} steps each, in turn ...", flush=True)
            group = run_group([(k, sys.executable, k) for k in ["project:default", *variants]], cfg, total)
            results["project:default (variants group)"] = group.pop("project:default")
            results.update(group)
        print(f"(benchmark wall time {time.time() - started:.0f} s)")
    print_tables(args, results, load_before, os.getloadavg())
    for name, r in results.items():
        if r.get("profile"):
            print(f"\n--- profile of {name} (whole worker, by own time) ---\n{r['profile']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "load_before": load_before,
                       "load_after": os.getloadavg()}, f, indent=1)


if __name__ == "__main__":
    main()
