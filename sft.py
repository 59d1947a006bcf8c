"""Stage 1 of 3D-RFT: the supervised warm-up (SFT) before reinforcement fine-tuning.

The paper first fine-tunes the video 3D MLLM with next-token cross-entropy on the answer tokens
only (prompt and visual tokens carry no loss). This teaches the output format and basic 3D
perception, so that GRPO afterwards samples answers that parse and can be rewarded.

    loss = - (1 / N_answer) * sum over answer tokens t of log p(y_t | frames, prompt, y_<t)

N_answer counts the answer tokens of the whole global batch, so one step gives the same gradient
whether it runs in one process or is split over `torchrun --nproc_per_node=N` processes (DDP
averages gradients over processes, which the loss scaling below undoes; so does FSDP).

Run:  python sft.py                      (toy model, synthetic data in data/toy, CPU)
      torchrun --nproc_per_node=2 sft.py  (same global batch, split over 2 processes)
      torchrun --nproc_per_node=2 sft.py --fsdp  (the same, weights and optimiser state sharded)
      python sft.py --resume              (continue exactly from runs/sft/latest)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Repeatable CPU runs: MKL otherwise picks matrix-multiply kernels by buffer alignment, so two runs
# (or a run and its resume) drift apart in the last bits; read when torch loads (docs/DESIGN.md section 8).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import eval as evaluation
import model as model_lib
import runtime

# =====================================================================================
# Settings (every one is a flag; the defaults are the toy demo's)
# =====================================================================================


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    at_least = runtime.int_at_least
    # ---- what to train, on what
    p.add_argument("--model", type=os.path.normpath, default="toy",
                   help="'toy' (tiny model built from a config) or a local checkpoint folder")
    p.add_argument("--data", type=os.path.normpath, default="data/toy",
                   help="data folder holding <split>/<task>.jsonl, or one published records file")
    p.add_argument("--split", default="train", help="split folder to train on")
    p.add_argument("--tasks", default="detection", type=evaluation.parse_tasks,
                   help="comma-separated tasks to mix: detection,grounding,spatial")
    p.add_argument("--limit", type=at_least(1), default=None, help="use at most this many records per task")
    p.add_argument("--out", type=os.path.normpath, default="runs/sft",
                   help="run folder: metrics.jsonl and the checkpoint 'latest/'")
    # The paper freezes the ViT (and VGGT) and trains the LLM and the geometry merger.
    p.add_argument("--train-vision", choices=["auto", "yes", "no"], default="auto",
                   help="train the ViT too: auto = yes for the random toy model, no for a checkpoint")
    runtime.add_data_arguments(p)
    runtime.add_model_arguments(p, training=True)
    # ---- optimisation (the paper gives no SFT hyper-parameters; these are the toy demo's)
    p.add_argument("--steps", type=at_least(1), default=2500, help="optimiser steps")
    p.add_argument("--batch-size", type=at_least(1), default=16,
                   help="global batch (records per optimiser step, all processes)")
    p.add_argument("--micro-batch", type=at_least(1), default=8,
                   help="records per forward pass (gradient accumulation)")
    p.add_argument("--lr", type=runtime.number(0, above=True), default=3e-3,
                   help="peak learning rate (the toy model needs a large one)")
    p.add_argument("--min-lr-ratio", type=runtime.number(0, 1), default=0.05,
                   help="cosine decays to this fraction of --lr")
    p.add_argument("--warmup", type=at_least(0), default=50, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=runtime.number(0), default=0.0, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=runtime.number(0), default=1.0,
                   help="clip the global gradient norm (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and the initialisation")
    # A control matched to another run's wall time (demo.sh's SFT -> more SFT against GRPO): the
    # step count that fits is not known in advance, so pair it with a constant learning rate
    # (--min-lr-ratio 1), which no --steps cut short.
    p.add_argument("--max-seconds", type=runtime.number(0, above=True), default=None,
                   help="end the run (its checkpoint written) after the first step that ends this many "
                        "seconds after the script started")
    # ---- bookkeeping: logs, checkpoints, periodic evaluation, resume, device
    runtime.add_run_arguments(p, log_every=10, save_every=250)
    args = p.parse_args(argv)
    if args.batch_size % args.micro_batch and args.micro_batch < args.batch_size:
        p.error("--batch-size must be a multiple of --micro-batch")
    runtime.check_model_arguments(p, args, args.model)  # --geometry / --geometry-dim
    return args


# =====================================================================================
# The loss: cross-entropy on answer tokens only
# =====================================================================================


def logits_needed(loss_mask: torch.Tensor) -> int:
    """How many trailing positions' logits the answer loss reads (0 = all; no answer tokens).

    Answers sit at the end of each row (collate left-pads), so one suffix, starting one position
    before the earliest answer token of the batch, covers every row. Asking the model for only
    that suffix (`logits_to_keep`) skips the LM head over the prompt and its visual tokens: for a
    real 152k vocabulary and thousands of visual tokens those logits are SFT's memory peak.
    Example: loss_mask [[0 0 0 1 1], [0 0 1 1 0]] -> the earliest answer is at 2 -> keep 5 - 2 + 1 = 4.
    """
    has_answer = loss_mask.any(1)
    if not has_answer.any():
        return 0
    first = loss_mask.float().argmax(1)[has_answer].min().item()   # earliest answer token
    return loss_mask.shape[1] - int(first) + 1 if first > 0 else 0


def answer_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of -log p over answer tokens (the caller divides by the global answer-token count).

    Position t predicts token t+1, so logits are shifted by one against the targets. `logits` may
    cover only the last k positions (see logits_needed); they then score tokens S-k+1 .. S-1.
    Example: input [p p a1 a2 EOS] with loss_mask [0 0 1 1 1] scores a1, a2, EOS from positions 1..3
    (all 5 logits, or the last k = 4).
    """
    start = input_ids.shape[1] - logits.shape[1] + 1      # first target token the logits can score
    targets = input_ids[:, start:]
    mask = loss_mask[:, start:].to(logits.dtype)
    token_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (token_loss.view_as(mask) * mask).sum()


def train_step(net, batches: list[dict], global_tokens: float, world_size: int, device) -> float:
    """Forward/backward over this process's micro-batches; returns the summed answer-token loss.

    Each micro-batch loss is scaled by world_size / global_tokens: DDP then averages over the
    world_size processes, which leaves exactly d(sum of token losses / global_tokens). A sharded
    model (--fsdp) averages the same way, after each micro-batch's backward.
    """
    total = 0.0
    for i, batch in enumerate(batches):
        batch = data.to_device(batch, device)
        last = i == len(batches) - 1
        context = net.no_sync() if isinstance(net, DDP) and not last else torch.enable_grad()
        with context:
            logits = net(**batch, logits_to_keep=logits_needed(batch["loss_mask"]))
            loss_sum = answer_token_loss(logits, batch["input_ids"], batch["loss_mask"])
            (loss_sum * world_size / global_tokens).backward()
        total += loss_sum.item()
    return total


# =====================================================================================
# The loop
# =====================================================================================


def load_training_records(args, quiet: bool) -> list[dict]:
    return [r for task in args.tasks for r in runtime.load_run_records(args, task, args.split, args.limit, quiet)]


def main(argv: list[str] | None = None) -> None:
    started = time.time()  # --max-seconds counts from here: loading the model is part of a run's time
    args = parse_args(argv)
    # One process, or one of torchrun's N (rank, world size and device from its environment).
    proc = runtime.setup_distributed(args.device)
    runtime.check_fsdp(args, proc)  # --fsdp needs torchrun's processes
    # Each process takes an equal share of the global batch, cut into equal micro-batches.
    if args.batch_size % (proc.world_size * min(args.micro_batch, args.batch_size)):
        raise SystemExit(f"error: --batch-size {args.batch_size} must split into "
                         f"{proc.world_size} processes x --micro-batch")
    # Before anything loads: a folder holding a run is refused without --resume / --overwrite,
    # and a folder another run is writing to is refused outright (rank 0 locks it).
    runtime.claim_run_folder(args.out, args.resume, args.overwrite, proc)
    # The same seed on every process: the same initial toy weights and the same data order.
    runtime.seed_everything(args.seed)
    latest = os.path.join(args.out, "latest")  # where checkpoints go
    try:
        records = load_training_records(args, quiet=not proc.master)
        source = runtime.resolve_checkpoint(latest) if args.resume else args.model
        # Every setting must match the checkpoint's, --model included: the weights come from the
        # checkpoint, but --model still decides (with --train-vision auto) which parameters train.
        # Checked before the model is loaded, so a refused resume costs no loading time.
        resume_state = runtime.read_training_state(source, vars(args)) if args.resume else None
        # On --resume the weights come from the checkpoint; otherwise from --model ("toy" builds it).
        # --geometry / --geometry-dim: the checkpoint's merger, a new one, or none.
        geometry, geometry_dim = runtime.geometry_arguments(args)
        net, tokenizer, image_cfg = model_lib.load_model(source, geometry=geometry, geometry_dim=geometry_dim,
                                                         seed=args.seed, dtype=runtime.weights_dtype(args))
        image_cfg = runtime.pixel_budget(image_cfg, args)
        # Every record must fit the model's context (a 338 KB record once took 24 GB) and carry
        # the geometry prior the model fuses.
        records = runtime.fit_lengths(records, tokenizer, image_cfg, runtime.max_seq_len(args, net),
                                      skip_bad=args.skip_bad, quiet=not proc.master)
    except (FileNotFoundError, ValueError) as e:  # data.RecordError is a ValueError
        raise SystemExit(f"error: {e}")
    net.to(proc.device)
    # The toy ViT starts random, so it must learn too; a real checkpoint's ViT stays frozen (paper).
    train_vision = args.train_vision == "yes" or (args.train_vision == "auto" and args.model == "toy")
    # What trains: all but the ViT, or LoRA adapters (--lora-rank); optional gradient checkpointing.
    params = runtime.trainable_setup(net, args, train_vision)
    if args.fsdp:
        # FSDP2 shards the model in place (a unit per decoder layer, then the root); the optimiser
        # must see the sharded parameters, so it is built after this.
        params = runtime.shard_model(net, proc)
    # AdamW with beta2 = 0.95, the usual choice for language-model training (nanoGPT's too).
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    start_step = 0
    if resume_state:
        runtime.restore_training_state(source, optimizer)
        start_step = resume_state["step"]
    # DDP averages gradients over processes on the last micro-batch's backward (see train_step);
    # a sharded model averages them itself, on every micro-batch's backward.
    ddp_net = DDP(net) if proc.enabled and not args.fsdp else net

    (logger,) = runtime.open_logs(args.out, ("metrics",), args.resume, start_step, proc.master)
    if proc.master:
        trained = sum(p.numel() for p in params) / 1e6
        print(f"SFT: {len(records)} records ({', '.join(args.tasks)}), "
              f"{model_lib.count_parameters(net) / 1e6:.2f} M parameters ({trained:.2f} M trained), "
              f"{proc.world_size} process(es), from step {start_step}")

    end_step = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    bar = tqdm(range(start_step, end_step), disable=not proc.master or args.no_progress, desc="sft",
               initial=start_step, total=args.steps)
    micro = min(args.micro_batch, args.batch_size // proc.world_size)  # records per forward pass here
    for step in bar:
        t0 = time.time()
        # The learning rate is a pure function of the step: a resumed run continues the same curve.
        lr = runtime.lr_at(step, args.lr, args.steps, args.warmup, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This process's slice of the step's global batch, cut into micro-batches.
        global_batch = runtime.step_indices(step, args.batch_size, len(records), args.seed)
        my_indices = runtime.shard(global_batch, proc.rank, proc.world_size)
        batches = [data.collate([records[i] for i in my_indices[j:j + micro]], tokenizer, image_cfg)
                   for j in range(0, len(my_indices), micro)]
        # N_answer of the module docstring: answer tokens of the whole global batch.
        local_tokens = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)
        global_tokens = runtime.all_reduce_sum(local_tokens, proc)
        with runtime.precision(args.dtype, proc.device, sharded=args.fsdp):  # bf16 autocast for --dtype bfloat16
            loss_sum = train_step(ddp_net, batches, global_tokens, proc.world_size, proc.device)
        # Clipping the global norm keeps one unusually large gradient from derailing a run at the
        # toy's high learning rate (with --grad-clip 0 the norm is only measured, for the log).
        max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        grad_norm = runtime.grad_norm_value(torch.nn.utils.clip_grad_norm_(params, max_norm))
        # The logged loss is the global-batch mean; a NaN stops the run before the optimiser step,
        # so the last checkpoint stays the last good state.
        loss = runtime.all_reduce_sum(loss_sum, proc) / global_tokens
        if not np.isfinite(loss):
            raise SystemExit(f"error: non-finite loss at step {step}: a learning rate too high, "
                             f"or NaN/inf in the inputs (e.g. geometry features); nothing was saved for this "
                             f"step, {runtime.last_checkpoint_text(latest)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.time() - t0
        # Every process must stop at the same step: the decision is rank 0's clock, shared.
        out_of_time = args.max_seconds is not None and runtime.all_reduce_sum(
            float(proc.master and time.time() - started >= args.max_seconds), proc) > 0
        if proc.master:
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            if step % args.log_every == 0 or step == end_step - 1 or out_of_time:
                logger.log({"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": float(grad_norm),
                            "tokens_per_s": round(global_tokens / seconds, 1), "step_s": round(seconds, 3)})
        # ---- periodic held-out evaluation (rank 0), then the checkpoint. The evaluation comes
        # first so that the checkpoint covers its log line (resuming drops and redoes later lines).
        done = step + 1
        if args.eval_every and done % args.eval_every == 0:
            # A sharded model is gathered whole on every process first; the others wait for rank 0.
            with runtime.whole_model(net, proc):
                if proc.master:
                    with runtime.precision(args.dtype, proc.device):
                        result = evaluation.evaluate(net, tokenizer, image_cfg, args.data, "val", tasks=args.tasks,
                                                     limit=args.eval_limit, progress=False,
                                                     record_options=runtime.record_options(args),
                                                     max_seq_len=runtime.max_seq_len(args, net))
                    logger.log({"step": step, "eval": result})
        if (args.save_every and done % args.save_every == 0) or done == end_step or out_of_time:
            state = {"step": done, "args": vars(args)}  # rank 0 writes; the others help gather (FSDP), then wait
            runtime.save_checkpoint(latest, net, tokenizer, image_cfg, optimizer, state, proc)
        if out_of_time:
            if proc.master:
                print(f"SFT: --max-seconds {args.max_seconds:g} reached after {done} steps")
            break
    bar.close()
    runtime.cleanup_distributed(proc)


if __name__ == "__main__":
    main(sys.argv[1:])
