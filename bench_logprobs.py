"""Peak memory of one policy pass's log-probs at a real vocabulary: plain vs chunked (grpo.py).

GRPO scores every completion token under the policy (with gradients) and the reference: a
log-softmax over the whole vocabulary at every position. For Qwen2.5-VL's 151,936 output rows,
8 completions x 400 tokens of fp32 logits are ~1.9 GB, and the plain computation
`log_softmax(logits.float() / T).gather(targets)` makes several such copies and keeps one for
the backward pass. `grpo.token_logprobs` does one row at a time under activation checkpointing.

Each variant runs in a fresh process: LM head (hidden -> logits), log-probs, a weighted sum,
backward; the figure is the process's peak resident memory above what it held before the pass.

Run:  python bench_logprobs.py            (8 rows x 400 tokens, vocabulary 151,936, fp32 and bf16)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def plain_logprobs(logits, targets, banned, temperature):
    """The computation grpo.py used before: full-vocabulary fp32 copies for all rows at once."""
    import torch

    z = logits.float()
    z[..., banned] = -float("inf")
    return torch.log_softmax(z / temperature, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def one_pass(variant: str, dtype: str, rows: int, tokens: int, vocab: int, hidden: int) -> dict:
    """Run one forward + backward of the log-probs; return the peak memory above the baseline."""
    import torch

    import grpo

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    states = torch.randn(rows, tokens, hidden, dtype=dt, requires_grad=True)   # the LLM's last hidden states
    head = torch.randn(vocab, hidden, dtype=dt) * hidden ** -0.5               # the (tied) LM head
    targets = torch.randint(0, vocab - 300, (rows, tokens))
    banned = list(range(vocab - 300, vocab))                                   # padding rows, special tokens
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                # KiB on Linux
    logits = states @ head.T
    if variant == "plain":
        logp = plain_logprobs(logits, targets, banned, 1.0)
    else:
        logp = grpo.token_logprobs(logits, targets, banned, 1.0)
    del logits  # only what autograd saved stays alive
    logp.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "dtype": dtype, "peak_gb": round((peak - before) / 2**20, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8, help="completions in the micro-batch")
    p.add_argument("--tokens", type=int, default=400, help="completion length")
    p.add_argument("--vocab", type=int, default=151_936, help="output rows of the LM head (Qwen2.5-VL)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size (small: only the logits matter here)")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    shape = (args.rows, args.tokens, args.vocab, args.hidden)
    if args.one:
        print(json.dumps(one_pass(*args.one, *shape)))
        return
    print(f"log-probs of {args.rows} rows x {args.tokens} tokens, vocabulary {args.vocab:,}: peak memory of one "
          f"forward + backward above the inputs (fresh process each)\n")
    print("| logits dtype | plain (full-vocabulary fp32 copies) | grpo.token_logprobs (row chunks) |")
    print("| --- | ---: | ---: |")
    for dtype in ("fp32", "bf16"):
        cells = []
        for variant in ("plain", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--tokens", str(args.tokens),
                                  "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--one", variant, dtype],
                                 capture_output=True, text=True, check=True)
            cells.append(f"{json.loads(out.stdout)['peak_gb']:.2f} GB")
        print(f"| {dtype} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
