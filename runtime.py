"""Training plumbing shared by sft.py and grpo.py: processes, schedules, logs and checkpoints.

Nothing here is specific to the paper; it is what both training stages need to run as
`python X.py` or `torchrun --nproc_per_node=N X.py` (raw torch.distributed, nanoGPT style):
- `setup_distributed` reads torchrun's environment variables (gloo on CPU, nccl on GPU);
- `lr_at` is linear warm-up then cosine decay;
- `JsonlLogger` writes one JSON object per line (rank 0 only);
- `shard_model`, `gathered`, `whole_model` are --fsdp (FSDP2): weights, gradients and optimiser
  state sharded over the processes, gathered whole for sampling and evaluation;
- `save_checkpoint` writes a folder that `model.load_model` also opens, with the optimiser and
  RNG states next to the weights, atomically (a crash never leaves half a folder), the same
  folder for a sharded model; `read_training_state` / `restore_training_state` resume from it exactly.
The periodic evaluation and checkpoint calls are written out in each training loop (sft.py,
grpo.py), where a reader of `main` sees them; this file imports no trainer and no evaluator.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

import data
import model as model_lib

# =====================================================================================
# Processes
# =====================================================================================


@dataclass
class Dist:
    """Where this process sits: rank among world_size processes; master logs and saves."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """--device: "auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N".

    A name torch does not know, or CUDA on a machine without it, ends in one line instead of a
    traceback from the first tensor moved there.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name!r} is not a device (use cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu...: never tried with this code
        raise SystemExit(f"error: --device {name}: only cpu and cuda are supported (use cpu, cuda, cuda:N or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}, but this machine has no usable CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (RANK/WORLD_SIZE set), else one process."""
    device = resolve_device(device)
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        # Under torchrun each process takes the GPU of its local rank; an index in --device is
        # ignored there (CUDA_VISIBLE_DEVICES chooses the GPUs of a torchrun job).
        torch.cuda.set_device(local_rank)
        # nccl for CUDA tensors, gloo for the few CPU scalars we all-reduce (token counts, logs)
        dist.init_process_group("cpu:gloo,cuda:nccl")
        return Dist(rank, world_size, local_rank, torch.device("cuda", local_rank))
    dist.init_process_group("gloo")
    return Dist(rank, world_size, local_rank, torch.device("cpu"))


def barrier(proc: Dist) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if proc.enabled:
        dist.barrier()


def cleanup_distributed(proc: Dist) -> None:
    """Tear the process group down once every process has reached this point.

    The barrier keeps one process from destroying its gloo connections while another is still
    using them (a 2-process test run once hung in teardown without it).
    """
    if proc.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(value: float, proc: Dist) -> float:
    """Sum a number over processes (identity in a single process)."""
    if not proc.enabled:
        return float(value)
    # float64 on the CPU: token counts and loss sums stay exact, and gloo carries CPU tensors
    # (the process group pairs gloo for CPU with nccl for CUDA).
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def seed_everything(seed: int) -> None:
    # Python, numpy and torch each keep their own generator; all three are seeded and saved.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# =====================================================================================
# Data order: which records a step sees (a function of the step, so resuming is exact)
# =====================================================================================


def step_indices(step: int, batch_size: int, num_records: int, seed: int) -> list[int]:
    """The global batch of `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    start = step * batch_size
    indices: list[int] = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_records)
        order = np.random.default_rng([seed, epoch]).permutation(num_records)
        take = min(batch_size - len(indices), num_records - offset)
        indices.extend(order[offset:offset + take].tolist())
    return indices


def shard(indices: list, rank: int, world_size: int) -> list:
    """This process's contiguous share of the global batch."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank:(rank + 1) * per_rank]


# =====================================================================================
# Flags every training script shares
# =====================================================================================


def int_at_least(minimum: int):
    """An argparse `type`: an int >= minimum, so that `--log-every 0` is a one-line usage error
    rather than a ZeroDivisionError many minutes into a run."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def number(minimum: float = -math.inf, maximum: float = math.inf, above: bool = False):
    """An argparse `type`: a finite float in [minimum, maximum] (> minimum with above=True).

    A negative --lr or --min-lr-ratio, a NaN --temperature or an --eps of 2 would not crash: they
    would silently train uphill or not at all. So they are usage errors (exit 2) before anything
    loads. Example: number(0, above=True)("0") -> "must be > 0, got 0.0".
    """
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum or (above and value == minimum) or value > maximum:
            low = f"> {minimum:g}" if above else f">= {minimum:g}"
            high = "" if maximum == math.inf else f" and <= {maximum:g}"
            raise argparse.ArgumentTypeError(f"must be {low}{high}, got {value:g}")
        return value
    return parse


def add_run_arguments(p, log_every: int, save_every: int) -> None:
    """Bookkeeping flags of sft.py and grpo.py: logs, checkpoints, evaluation, resume, device."""
    p.add_argument("--log-every", type=int_at_least(1), default=log_every, help="steps between metric lines")
    p.add_argument("--save-every", type=int_at_least(0), default=save_every,
                   help="steps between checkpoints (0 = only the one at the end, which is always written)")
    p.add_argument("--eval-every", type=int_at_least(0), default=0, help="steps between held-out evaluations (0 = off)")
    p.add_argument("--eval-limit", type=int_at_least(1), default=32, help="held-out records per periodic evaluation")
    # A folder that holds a run is never silently replaced: say --resume or --overwrite.
    what_to_do = p.add_mutually_exclusive_group()
    what_to_do.add_argument("--resume", action="store_true",
                            help="continue from <out>/latest exactly (same settings; only logging, checkpoint, "
                                 "evaluation, --stop-after, --out, device and --fsdp flags may change)")
    what_to_do.add_argument("--overwrite", action="store_true",
                            help="replace the run already in --out (its logs and checkpoints are deleted)")
    p.add_argument("--stop-after", type=int_at_least(1), default=None,
                   help="end this run after this step (schedules still span --steps)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def add_data_arguments(p) -> None:
    """Where records come from and how bad ones are handled (sft.py, grpo.py, eval.py)."""
    p.add_argument("--media-root", default=None,
                   help="folder that relative image / video / geometry paths start from (VG LLM: data/media; "
                        "default: the records file's folder)")
    p.add_argument("--num-frames", type=int_at_least(1), default=None,
                   help="frames sampled from each video of VSI-Bench rows (default 32, as VSI-Bench evaluates)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed records (and ones longer than --max-seq-len) and count them, "
                        "instead of stopping at the first with its one-line error")
    p.add_argument("--max-seq-len", type=int_at_least(1), default=None,
                   help="longest prompt + answer in tokens, visual tokens included "
                        "(default: the model's max_position_embeddings)")


def add_model_arguments(p, training: bool) -> None:
    """Geometry prior, precision, pixel budget and (for training) LoRA and gradient checkpointing.

    After parse_args, `check_model_arguments(p, args, checkpoint)` turns bad combinations into
    usage errors; `geometry_arguments(args)` gives load_model's (geometry, geometry_dim).
    """
    p.add_argument("--geometry", choices=tuple(model_lib.GEOMETRY_FLAG), default="auto",
                   help="geometry prior: as the checkpoint has it (auto; the toy's is on), on (the checkpoint's "
                        "merger, or a new zero-initialised one of --geometry-dim inputs), or dropped (off)")
    p.add_argument("--geometry-dim", type=int_at_least(1), default=None,
                   help="features per patch of a new geometry merger, with --geometry on, for a checkpoint "
                        "without one (2048 for VGGT-1B features, 3 or 4 for 3D points from depth maps)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: forward passes under bf16 autocast, fp32 master weights where they train "
                        "(full fine-tuning), bf16 where they do not (the reference, a LoRA base)")
    p.add_argument("--max-pixels", type=int_at_least(1), default=None,
                   help=f"pixel budget per frame (default: the checkpoint's, capped at VG LLM's "
                        f"{VG_LLM_MAX_PIXELS} = 576 * 28 * 28)")
    p.add_argument("--min-pixels", type=int_at_least(1), default=None, help="smallest frame (default: the checkpoint's)")
    if not training:
        return
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the LLM layers' activations in the backward pass (less memory, ~30%% more time)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimiser state over torchrun's processes (FSDP2, a unit per "
                        "LLM decoder layer) instead of replicating them (DDP); needs N >= 2 processes")
    # The paper trains spatial reasoning with LoRA (and beta = 0), perception with full fine-tuning.
    p.add_argument("--lora-rank", type=int_at_least(0), default=0, help="LoRA rank r (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=number(0, above=True), default=16.0, help="LoRA scale alpha (update * alpha / r)")
    p.add_argument("--lora-dropout", type=number(0, 1), default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora-targets", default=",".join(model_lib.LORA_TARGETS),
                   help="comma-separated linear layers of the LLM's decoder layers that get adapters")


VG_LLM_MAX_PIXELS = 576 * 28 * 28  # VG LLM trains and evaluates at 576 merged tokens per frame


def geometry_arguments(args) -> tuple[bool | None, int | None]:
    """--geometry and --geometry-dim as model.load_model / load_reference take them."""
    return model_lib.geometry_from_flags(args.geometry, args.geometry_dim)


def check_model_arguments(p: argparse.ArgumentParser, args, checkpoint: str) -> None:
    """Usage errors (exit 2, one line) for flag combinations that cannot load, before anything does.

    --geometry-dim needs --geometry on; --geometry on needs --geometry-dim for a `checkpoint`
    that has no merger (read from its rft3d.json: the hub's checkpoints have none). Where the
    checkpoint cannot be read here (not there yet, damaged), load_model names the problem.
    """
    try:
        geometry, dim = geometry_arguments(args)
    except ValueError as e:
        p.error(str(e))
    if geometry and dim is None and model_lib.saved_geometry_dim(checkpoint) == 0:
        p.error(f"--geometry on: {checkpoint} has no geometry merger; give --geometry-dim N, the features per "
                f"patch of the records' priors (2048 for VGGT-1B features, 3 or 4 for 3D points from depth)")


def pixel_budget(image_cfg: model_lib.ImageConfig, args) -> model_lib.ImageConfig:
    """The image config with --min-pixels / --max-pixels applied.

    Without --max-pixels the checkpoint's budget is capped at VG LLM's: Qwen2.5-VL-3B ships
    max_pixels 12,845,056, ~1,610 visual tokens for a raw 1296 x 968 ScanNet frame, where VG LLM
    uses 576. The toy model's budget is below the cap, so it is unchanged.
    """
    max_pixels = args.max_pixels if args.max_pixels is not None else min(image_cfg.max_pixels, VG_LLM_MAX_PIXELS)
    min_pixels = args.min_pixels if args.min_pixels is not None else image_cfg.min_pixels
    if min_pixels > max_pixels:
        raise SystemExit(f"error: --min-pixels {min_pixels} is above the pixel budget {max_pixels}")
    return dataclasses.replace(image_cfg, min_pixels=min_pixels, max_pixels=max_pixels)


def precision(dtype: str, device: torch.device, sharded: bool = False):
    """The context forward passes run in: bf16 autocast for --dtype bfloat16, else nothing.

    `sharded=True` for the training passes of an --fsdp model: autocast's cache of bf16 weight
    copies is then off. The cache lasts the whole `with` block, and FSDP gathers a layer's weights
    anew for each micro-batch; a copy cast in the first micro-batch and reused in the next is an
    older autograd node, so its weight gradient arrives after FSDP has already reduced that
    layer's gradients, and is lost (measured: grad norm 3.40 instead of 3.80, 2 micro-batches).
    A training forward uses each weight once, so the cache saved nothing there.
    """
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=not sharded)
    return contextlib.nullcontext()


def weights_dtype(args, training: bool = True) -> torch.dtype:
    """The dtype weights are loaded in: fp32 masters for full fine-tuning (a bf16 weight cannot
    take an update of lr 1e-6: it is below half its rounding step), bf16 for a frozen LoRA base."""
    if args.dtype == "bfloat16" and (not training or getattr(args, "lora_rank", 0) > 0):
        return torch.bfloat16
    return torch.float32


def trainable_setup(net: model_lib.RFTModel, args, train_vision: bool) -> list[torch.nn.Parameter]:
    """LoRA, gradient checkpointing and train mode as the flags say; returns what the optimiser trains.

    A checkpoint that carries adapters is a LoRA run being resumed (its adapters keep training)
    or, for a new run, a LoRA result whose adapters are merged into the base first.
    """
    if model_lib.has_lora(net) and not args.resume:
        model_lib.merge_lora(net)
    if model_lib.has_lora(net):
        params = model_lib.lora_parameters(net)
    elif args.lora_rank > 0:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        params = model_lib.add_lora(net, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, seed=args.seed)
    else:
        params = trainable_parameters(net, train_vision)
    if args.gradient_checkpointing:
        model_lib.enable_gradient_checkpointing(net)
    net.train()
    return params


RECORD_OPTIONS = ("media_root", "num_frames", "skip_bad")  # add_data_arguments' flags that reading takes


def record_options(args) -> dict:
    """--media-root, --num-frames and --skip-bad as `load_task_records` takes them."""
    return {"media_root": args.media_root, "num_frames": args.num_frames, "skip_bad": args.skip_bad}


def load_task_records(data_path: str, task: str, split: str, limit: int | None = None, quiet: bool = False,
                      media_root: str | None = None, num_frames: int | None = None,
                      skip_bad: bool = False) -> list[dict]:
    """The records of one task: checked, paths resolved, bad ones skipped (and counted) if asked.

    `data_path` is a data folder (`<split>/<task>.jsonl` inside) or one published file as it is
    (VG LLM's JSON array, VSI-Bench rows). `limit` keeps the first records (eval.py's --limit
    takes a seeded subset of all of them instead). The skip count goes to stderr.
    """
    if not os.path.exists(data_path):
        raise FileNotFoundError(f"data directory not found: {data_path} (records not found: "
                                f"{os.path.join(data_path, split, task + '.jsonl')}; generate the toy data with: "
                                f"python scenes.py)")
    # the file (not the split folder), so that a missing one is named in the error
    path = data_path if os.path.isfile(data_path) else os.path.join(data_path, split, f"{task}.jsonl")
    records, skipped = data.load_records_checked(path, task, limit, media_root=media_root, num_frames=num_frames,
                                                 skip_bad=skip_bad)
    if skipped and not quiet:
        print(f"skipped {len(skipped)} bad {task} record(s) of {path}; the first: {skipped[0]}", file=sys.stderr)
    return records


def load_run_records(args, task: str, split: str, limit: int | None = None, quiet: bool = False) -> list[dict]:
    """`load_task_records` of --data with the scripts' --media-root, --num-frames, --skip-bad."""
    return load_task_records(args.data, task, split, limit, quiet, **record_options(args))


def max_seq_len(args, net: model_lib.RFTModel) -> int:
    """--max-seq-len, by default the model's context (max_position_embeddings)."""
    return args.max_seq_len or net.lm.config.text_config.max_position_embeddings


def fit_lengths(records: list[dict], tokenizer, image_cfg, limit: int, completion_tokens: int | None = None,
                skip_bad: bool = False, quiet: bool = False) -> list[dict]:
    """The records that fit the model (data.check_lengths), or a one-line error.

    Two things are checked per record: prompt + visual tokens + answer (`completion_tokens`, the
    budget, when the answer is generated) within `limit` tokens, and its geometry prior usable
    by the model (present where the model fuses one, of the merger's size, on a grid that maps
    to the frame's patches). A failing record raises data.RecordError, or with `skip_bad` is
    dropped and counted (on stderr); a data.RecordError also when none is left.
    """
    kept, dropped = data.check_lengths(records, tokenizer, image_cfg, limit, completion_tokens=completion_tokens,
                                       skip_bad=skip_bad)
    what = f"too long for --max-seq-len {limit}, or no usable geometry prior"
    if not kept:
        first = f"; the first: {dropped[0]}" if dropped else ""
        raise data.RecordError(f"no record left: all {len(records)} {what}{first}")
    if dropped and not quiet:
        print(f"skipped {len(dropped)} record(s) {what}; the first: {dropped[0]}", file=sys.stderr)
    return kept


# =====================================================================================
# Schedule and logs
# =====================================================================================


def lr_at(step: int, max_lr: float, total_steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up to max_lr over `warmup` steps, then cosine decay to min_ratio * max_lr."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class JsonlLogger:
    """Append metrics as JSON lines (one object per step); a no-op off the master process."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def open_logs(out: str, names: tuple[str, ...], resume: bool, start_step: int, master: bool) -> list[JsonlLogger]:
    """One JSON-lines logger per name under `out`: fresh files, or on resume cut back to start_step."""
    loggers = []
    for name in names:
        path = os.path.join(out, f"{name}.jsonl")
        if master:
            os.makedirs(out, exist_ok=True)
            if resume:
                truncate_log(path, start_step)
            elif os.path.exists(path):
                os.remove(path)
        loggers.append(JsonlLogger(path, enabled=master))
    return loggers


def truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines written after the checkpoint's step (they will be redone)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", -1) < step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash: dropped
                continue
    with open(path, "w") as f:
        f.writelines(kept)


# =====================================================================================
# Sharding (FSDP2): --fsdp
# =====================================================================================
#
# DDP keeps a whole copy of the weights, gradients and AdamW moments on every process; with
# --fsdp, `torch.distributed.fsdp.fully_shard` (FSDP2) keeps 1/N of each on each of N processes
# and all-gathers a module's weights just before it runs. The units: each LLM decoder layer, then
# the root (everything else: embeddings, LM head, final norm, ViT, geometry merger). After
# `fully_shard` the parameters are DTensor shards (new objects), so the optimiser is built after
# it. Gradients are averaged over processes as DDP averages them, so the trainers' loss scaling
# (x world_size / global count) is the same; they are reduce-scattered after every micro-batch
# (no `no_sync`: accumulating whole gradients would give back the memory FSDP saves).
# FSDP only gathers around `forward`. Sampling and evaluation call other methods (`vision_tokens`,
# `fuse_geometry`, `prefill`, `generate_from`, `generate`), so they run inside `gathered` /
# `whole_model`, which unshard every unit on every process first (an all-gather: all processes
# take part). Checkpoints are written whole, in the same folder format as without --fsdp
# (`model.load_model` opens them, optimizer.pt has the one-process layout), so a run may resume
# with or without --fsdp. --fsdp needs torchrun with 2 or more processes (`check_fsdp`).

FSDP_FORWARD_METHODS = ("prefill", "generate_from", "generate")  # RFTModel entry points besides forward
_PLAIN_TWINS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def check_fsdp(args, proc: Dist) -> None:
    """--fsdp shards over torchrun's processes: in one process it is an error, not a silent no-op."""
    if getattr(args, "fsdp", False) and not proc.enabled:
        raise SystemExit("error: --fsdp shards the model over processes: run under torchrun --nproc_per_node=N "
                         "with N >= 2, or leave --fsdp out")


def is_sharded(net: torch.nn.Module) -> bool:
    return isinstance(net, FSDPModule)


def shard_model(net: model_lib.RFTModel, proc: Dist, trained: bool = True) -> list[torch.nn.Parameter]:
    """fully_shard each LLM decoder layer, then the root; returns the (now sharded) trained parameters.

    Call it after LoRA and gradient checkpointing are set up (`trainable_setup`) and before the
    optimiser is built. Frozen parameters (the ViT, a LoRA base) are sharded too; FSDP leaves
    them out of the gradient reduction. `trained=False` (GRPO's frozen reference, forward only)
    also frees the root's gathered weights after each forward: without a backward nothing else
    would. A trained model keeps a parameter-free copy of its module tree (meta tensors) for
    `whole_copy`, which checkpoints need.
    """
    mesh = torch.distributed.device_mesh.init_device_mesh(proc.device.type, (proc.world_size,))
    if trained:
        # Every parameter stands in as a meta tensor (no memory); the tree itself is copied.
        memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                for p in net.parameters()}
        _PLAIN_TWINS[net] = copy.deepcopy(net, memo)
    for layer in net.lm.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh, reshard_after_forward=None if trained else True)  # None: the root stays gathered
    for name in FSDP_FORWARD_METHODS:
        # So that FSDP's root bookkeeping runs on these calls too (GRPO's first call is a prefill).
        register_fsdp_forward_method(net, name)
    for name in ("generate", "generate_from"):
        # Hugging Face's `generate` on an FSDP-managed model otherwise all-reduces at every token
        # so that all processes decode in step (`synced_gpus`). Here decoding always runs on a
        # gathered model (`gathered`), with nothing to keep in step: each process stops at its own
        # EOS, and rank 0 can evaluate alone.
        setattr(net, name, functools.partial(getattr(net, name), synced_gpus=False))
    return [p for p in net.parameters() if p.requires_grad]


def fsdp_units(net: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in net.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(net: torch.nn.Module):
    """The whole model on every process inside the block (a no-op for a model that is not sharded).

    For calls other than the root forward (sampling): every unit is all-gathered once and kept so
    (`set_reshard_after_forward(False)`), so a decoding step does not all-gather each layer again
    for every token. Every process must enter (the all-gather is a collective). On exit the
    shards are put back and the layers reshard after their forward again (the root never does).
    """
    if not is_sharded(net):
        yield net
        return
    units = fsdp_units(net)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield net
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not net, recurse=False)


@contextlib.contextmanager
def whole_model(net: torch.nn.Module, proc: Dist):
    """For work that rank 0 does alone (the periodic evaluation): with a sharded model every
    process gathers the weights, then waits at a barrier until rank 0 is done; otherwise nothing."""
    if not is_sharded(net):
        yield net
        return
    with gathered(net):
        try:
            yield net
        finally:
            barrier(proc)


def whole_tensor(value, keep: bool = True):
    """A DTensor shard -> the whole tensor on the CPU (a collective: every process calls it, in
    the same order); None where `keep` is False (only rank 0 keeps what it writes). Anything
    else is returned as it is."""
    if not isinstance(value, DTensor):
        return value
    full = value.full_tensor()
    return full.cpu() if keep else None


def whole_copy(net: model_lib.RFTModel, keep: bool) -> model_lib.RFTModel | None:
    """A plain (unsharded) copy of a sharded model's weights on the CPU, for `model.save_model`.

    Collective; the copy is built where `keep` is True (rank 0) and None elsewhere. It is the
    module tree saved by `shard_model`, given the gathered tensors (tied weights stay tied: they
    are one tensor in the state dict and gathered once).
    """
    gathered_once: dict[int, torch.Tensor | None] = {}
    state = {}
    with torch.no_grad():
        # keep_vars: the Parameter objects themselves (DTensor shards), so a tied one is seen as one
        for key, value in net.state_dict(keep_vars=True).items():
            if id(value) not in gathered_once:
                gathered_once[id(value)] = whole_tensor(value, keep)
            state[key] = gathered_once[id(value)]
    if not keep:
        return None
    twin = copy.deepcopy(_PLAIN_TWINS[net])
    twin.load_state_dict(state, assign=True)
    return twin


def whole_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
    """`optimizer.state_dict()` with every DTensor moment gathered whole: the file a one-process run
    writes (parameters by index, in order). Collective; None where `keep` is False."""
    state = optimizer.state_dict()  # its inner dicts are the live state: build new ones
    moments = {index: {k: whole_tensor(v, keep) for k, v in entry.items()} for index, entry in state["state"].items()}
    return {"state": moments, "param_groups": state["param_groups"]} if keep else None


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimiser state (as `whole_optimizer_state` writes it) cut to this process's shards.

    Each moment shaped like its parameter becomes a DTensor laid out as the parameter is; every
    process has read the whole file, so each takes its own slice (`src_data_rank=None`: no
    communication). The state of a model that is not sharded is returned unchanged.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state

    def like(value, p):
        if not (isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape):
            return value  # AdamW's step count, or a moment of an unsharded parameter
        piece = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
        # A copy of this process's slice, so that the whole tensor it is a view of can go.
        return DTensor.from_local(piece.to_local().clone(), p.device_mesh, p.placements, shape=p.shape,
                                  stride=p.stride())

    moments = {index: {k: like(v, params[index]) for k, v in entry.items()} for index, entry in state["state"].items()}
    return {**state, "state": moments}


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """`clip_grad_norm_`'s result as a plain tensor (over sharded gradients it is a DTensor)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# =====================================================================================
# Checkpoints
# =====================================================================================

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.pt"


def save_checkpoint(path: str, net: model_lib.RFTModel, tokenizer, image_cfg, optimizer, state: dict,
                    proc: Dist | None = None) -> None:
    """Write model (safetensors), optimiser, RNG and `state` (step, args...) atomically to `path`.

    Everything goes to `path.tmp` first, `trainer_state.json` last (itself through a rename), so
    a `path.tmp` holding it is complete. Then `path` becomes `path.old` and `path.tmp` becomes
    `path`. A process killed at any instant leaves `path`, or a complete `path.tmp` beside
    `path.old`, or `path.old` alone: `resolve_checkpoint` finds the newest complete one, and
    `claim_run_folder` puts it back in place when the run is resumed.
    Under torchrun (`proc` given) rank 0 writes and every process waits for it at a barrier.
    A sharded model (--fsdp) is first gathered whole, weights and optimiser state, by every
    process together; rank 0 writes what it gathered, in the same files as without --fsdp.
    """
    optimizer_state = None
    if is_sharded(net):
        master = proc is None or proc.master
        net, optimizer_state = whole_copy(net, keep=master), whole_optimizer_state(optimizer, keep=master)
    if proc is not None and not proc.master:
        barrier(proc)
        return
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model_lib.save_model(net, tokenizer, image_cfg, tmp)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state,
               os.path.join(tmp, OPTIMIZER_FILE))
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    # Optimiser moments and RNG states are not model weights: torch.save keeps their exact types.
    torch.save(rng, os.path.join(tmp, RNG_FILE))
    with open(os.path.join(tmp, STATE_FILE + ".part"), "w") as f:
        json.dump(state, f, indent=1)
    os.replace(os.path.join(tmp, STATE_FILE + ".part"), os.path.join(tmp, STATE_FILE))  # now complete
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)  # a kill right here leaves `path.old` and a complete `path.tmp`
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    if proc is not None:
        barrier(proc)


def is_complete(folder: str) -> bool:
    """Did save_checkpoint finish writing this folder? (its trainer_state.json is written last)"""
    return os.path.isfile(os.path.join(folder, STATE_FILE))


def resolve_checkpoint(path: str) -> str:
    """The newest complete checkpoint of `path`: itself, else a complete `path.tmp` (a write cut
    between its two renames), else `path.old`; `path` when there is none, for the caller's error."""
    if os.path.isdir(path):
        return path
    for candidate in (path + ".tmp", path + ".old"):
        if os.path.isdir(candidate) and is_complete(candidate):
            return candidate
    return path


def checkpoint_step(path: str) -> int | None:
    """The step of the checkpoint `resolve_checkpoint(path)` would resume from, or None."""
    found = resolve_checkpoint(path)
    if not is_complete(found):
        return None
    with open(os.path.join(found, STATE_FILE)) as f:
        return int(json.load(f).get("step", 0))


def last_checkpoint_text(path: str) -> str:
    """For error messages: which checkpoint a user can go back to, as it really is on disk."""
    step = checkpoint_step(path)
    return "no checkpoint has been written yet" if step is None else f"the last checkpoint is {path} (step {step})"


def read_training_state(path: str, args: dict | None = None, also_free: tuple[str, ...] = (),
                        flag_of: dict[str, str] | None = None) -> dict:
    """The `state` dict of a resumable checkpoint folder, after checking the new run's flags.

    With `args` (the new run's flags), `check_resume_args` runs here, before any weights or
    optimiser state are loaded, so that changed settings stop the run at once with its one-line
    message rather than after minutes of loading, or with a traceback from an optimiser whose
    parameter groups no longer match.
    """
    if not os.path.isdir(path):
        raise SystemExit(f"error: nothing to resume: {path} does not exist")
    for name in (OPTIMIZER_FILE, STATE_FILE, RNG_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise SystemExit(f"error: {path} is not a resumable checkpoint (no {name})")
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    if args is not None:
        check_resume_args(state.get("args", {}), args, also_free, flag_of)
    return state


def restore_training_state(path: str, optimizer) -> None:
    """Load the optimiser state and the torch / numpy / Python RNG states saved in `path`.

    The optimiser file is whole; for a sharded model (--fsdp) each process keeps its shards.
    """
    saved = torch.load(os.path.join(path, OPTIMIZER_FILE), weights_only=False)
    optimizer.load_state_dict(shard_optimizer_state(saved, optimizer))
    rng = torch.load(os.path.join(path, RNG_FILE), weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


# Flags that may differ on --resume: bookkeeping that does not change what is computed.
# `out` too: a run folder may be moved or copied before it is resumed. `device` and `fsdp` change
# only how it is computed (the last bits of sums, not the run): a checkpoint is the same either way.
RESUME_FREE_FLAGS = frozenset({"resume", "overwrite", "gradient_checkpointing", "fsdp", "stop_after", "max_seconds",
                               "no_progress", "log_every", "save_every", "eval_every", "eval_limit", "sample_every",
                               "device", "out"})


def check_resume_args(saved: dict, current: dict, also_free: tuple[str, ...] = (),
                      flag_of: dict[str, str] | None = None) -> None:
    """Stop with one line when --resume is given settings that differ from the checkpoint's.

    An exact resume needs the same run: a different --lr, --steps (the schedule's length) or data
    would silently splice two runs together. Bookkeeping flags (RESUME_FREE_FLAGS, plus
    `also_free`) may change. Values are compared as the checkpoint stores them (JSON), so a
    tuple and the list it was saved as are equal. A derived setting compared in place of its
    flag (grpo's parsed reward weights, so that "f1=1" and "f1=1.0" agree) is named by the flag
    it comes from through `flag_of`. Example message:
        error: --resume with settings that differ from the checkpoint's: --lr 0.0001 (checkpoint: 0.0003)
    """
    current = json.loads(json.dumps(current))  # tuples -> lists, as in trainer_state.json
    free = RESUME_FREE_FLAGS | set(also_free)
    flag_of = flag_of or {}
    changed = [f"--{flag_of.get(k, k).replace('_', '-')} {current[k]} (checkpoint: {saved[k]})"
               for k in sorted(saved) if k in current and k not in free and current[k] != saved[k]]
    if changed:
        raise SystemExit("error: --resume with settings that differ from the checkpoint's: " + "; ".join(changed)
                         + ". Pass the checkpoint's values, or start a new run (a new --out) from it.")


def trainable_parameters(net: torch.nn.Module, train_vision: bool) -> list[torch.nn.Parameter]:
    """Freeze the Qwen ViT and its merger unless asked (the paper trains the LLM + geometry merger)."""
    for name, p in net.named_parameters():
        p.requires_grad = train_vision or ".visual." not in f".{name}"
    return [p for p in net.parameters() if p.requires_grad]


# =====================================================================================
# Run folders: never destroy finished work, one run per folder
# =====================================================================================

LOCK_FILE = "run.lock"  # holds the pid and host of the run writing into the folder


def holds_a_run(out: str) -> bool:
    """Does `out` hold (part of) a run: logs or a checkpoint, complete or not?"""
    names = ("metrics.jsonl", "samples.jsonl", "latest", "latest.tmp", "latest.old")
    return any(os.path.exists(os.path.join(out, name)) for name in names)


def claim_run_folder(out: str, resume: bool, overwrite: bool, proc: Dist) -> None:
    """Check `out` before anything is loaded and lock it for this run (rank 0 acts, all wait).

    A folder that already holds a run is refused unless --resume (continue it) or --overwrite
    (replace it) says what to do with it: re-running a finished command must not wipe its logs
    and checkpoint. A second run on a locked folder is refused with the holder's pid; a lock left
    by a killed run (its pid no longer alive on this host) is taken over. Example message:
        error: runs/sft already holds a run (metrics.jsonl, latest/): pass --resume to continue it, ...
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a file, not a run folder")
    if proc.master:  # rank 0 speaks for the job; torchrun stops the others if it exits
        check_and_lock_run_folder(out, resume, overwrite)
    barrier(proc)  # nobody reads the folder before rank 0 has repaired it


def check_and_lock_run_folder(out: str, resume: bool, overwrite: bool) -> None:
    """Rank 0's part of claim_run_folder."""
    if holds_a_run(out) and not resume and not overwrite:
        found = ", ".join(n for n in ("metrics.jsonl", "latest/") if os.path.exists(os.path.join(out, n.strip("/"))))
        raise SystemExit(f"error: {out} already holds a run ({found or 'an unfinished checkpoint'}): pass --resume "
                         "to continue it, --overwrite to replace it, or choose another --out")
    os.makedirs(out, exist_ok=True)
    take_lock(os.path.join(out, LOCK_FILE))
    latest = os.path.join(out, "latest")
    if overwrite and not resume:
        for name in (latest, latest + ".tmp", latest + ".old"):  # the old run's checkpoints go
            shutil.rmtree(name, ignore_errors=True)
    elif resume and resolve_checkpoint(latest) != latest:
        # A write cut between its renames left the newest complete copy as latest.tmp or .old:
        # it goes back to `latest` before anything reads it (a run resumed at its last step
        # would otherwise never write `latest` again).
        os.replace(resolve_checkpoint(latest), latest)


def take_lock(path: str) -> None:
    """Create `path` exclusively with our pid (released at exit); refuse if a live run holds it."""
    host = socket.gethostname()
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = read_lock(path)
            ours = holder is not None and holder == (os.getpid(), host)  # an earlier main() of this process
            if holder is not None and not ours and (holder[1] != host or pid_alive(holder[0])):
                where = "" if holder[1] == host else f" on {holder[1]}"
                raise SystemExit(f"error: {os.path.dirname(path)} is in use by another run (pid {holder[0]}{where}); "
                                 f"wait for it, or choose another --out (remove {path} if that run is gone)")
            os.remove(path)  # ours, or the holder was killed (kill -9 leaves its lock behind)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host}, f)
        atexit.register(release_lock, path)
        return
    raise SystemExit(f"error: could not lock {path}")


def read_lock(path: str) -> tuple[int, str] | None:
    """(pid, host) of a lock file, or None when it is unreadable (then treated as stale)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    """Is a process with this pid running on this machine? (signal 0 only checks)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours
    return True


def release_lock(path: str) -> None:
    """Remove our lock at exit (only if it is still ours)."""
    holder = read_lock(path)
    if holder is not None and holder[0] == os.getpid():
        os.remove(path)
