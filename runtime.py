"""Training plumbing shared by sft.py and grpo.py: processes, schedules, logs and checkpoints.

Nothing here is specific to the paper; it is what both training stages need to run as
`python X.py` or `torchrun --nproc_per_node=N X.py` (raw torch.distributed, nanoGPT style):
- `setup_distributed` reads torchrun's environment variables (gloo on CPU, nccl on GPU);
- `lr_at` is linear warm-up then cosine decay;
- `JsonlLogger` writes one JSON object per line (rank 0 only);
- `save_checkpoint` writes a folder that `model.load_model` also opens, with the optimiser and
  RNG states next to the weights, atomically (a crash never leaves half a folder);
  `read_training_state` / `restore_training_state` resume from it exactly.
The periodic evaluation and checkpoint calls are written out in each training loop (sft.py,
grpo.py), where a reader of `main` sees them; this file imports no trainer and no evaluator.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

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


def add_run_arguments(p, log_every: int, save_every: int) -> None:
    """Bookkeeping flags of sft.py and grpo.py: logs, checkpoints, evaluation, resume, device."""
    p.add_argument("--log-every", type=int_at_least(1), default=log_every, help="steps between metric lines")
    p.add_argument("--save-every", type=int_at_least(0), default=save_every,
                   help="steps between checkpoints (0 = only the one at the end, which is always written)")
    p.add_argument("--eval-every", type=int_at_least(0), default=0, help="steps between held-out evaluations (0 = off)")
    p.add_argument("--eval-limit", type=int_at_least(1), default=32, help="held-out records per periodic evaluation")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/latest exactly (same settings; only logging, checkpoint, evaluation, --stop-after, --out and device flags may change)")
    p.add_argument("--stop-after", type=int_at_least(1), default=None,
                   help="end this run after this step (schedules still span --steps)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


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
# Checkpoints
# =====================================================================================

OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.pt"


def save_checkpoint(path: str, net: model_lib.RFTModel, tokenizer, image_cfg, optimizer, state: dict,
                    proc: Dist | None = None) -> None:
    """Write model (safetensors), optimiser, RNG and `state` (step, args...) atomically to `path`.

    Everything goes to `path.tmp` first and is renamed into place, so `path` is always either the
    previous complete checkpoint or the new complete one. Under torchrun (`proc` given) rank 0
    writes and every process waits for it at a barrier, so no process runs ahead of a checkpoint.
    """
    if proc is not None and not proc.master:
        barrier(proc)
        return
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model_lib.save_model(net, tokenizer, image_cfg, tmp)
    torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    # Optimiser moments and RNG states are not model weights: torch.save keeps their exact types.
    torch.save(rng, os.path.join(tmp, RNG_FILE))
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, old)  # a crash right here leaves `path.old`, which resolve_checkpoint finds
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    if proc is not None:
        barrier(proc)


def resolve_checkpoint(path: str) -> str:
    """`path`, or `path.old` when a crash hit between the two renames of save_checkpoint."""
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        return path + ".old"
    return path


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
    """Load the optimiser state and the torch / numpy / Python RNG states saved in `path`."""
    optimizer.load_state_dict(torch.load(os.path.join(path, OPTIMIZER_FILE), weights_only=False))
    rng = torch.load(os.path.join(path, RNG_FILE), weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


# Flags that may differ on --resume: bookkeeping that does not change what is computed.
# `out` too: a run folder may be moved or copied before it is resumed.
RESUME_FREE_FLAGS = frozenset({"resume", "stop_after", "no_progress", "log_every", "save_every",
                               "eval_every", "eval_limit", "sample_every", "device", "out"})


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
