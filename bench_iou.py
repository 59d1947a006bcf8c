"""Throughput of the exact 3D IoU in boxes.py (pairs per second, one CPU thread).

    python bench_iou.py --pairs 2000

Boxes are random and overlapping (centres within 0.3 m, sizes 0.3-2 m): the slow path, since
disjoint pairs leave through the bounding-sphere / AABB exits. Three cases are timed:
oriented boxes (general yaw, roll, pitch), axis-aligned boxes, and disjoint boxes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from boxes import box3d_iou


def random_boxes(rng: np.random.Generator, n: int, spread: float, aligned: bool) -> np.ndarray:
    """n random 9-number boxes with centres in [-spread, spread]^3."""
    centres = rng.uniform(-spread, spread, (n, 3))
    sizes = rng.uniform(0.3, 2.0, (n, 3))          # metres, as indoor furniture
    # yaw, roll, pitch: all zero (axis-aligned) or anywhere (the general clipping path)
    angles = np.zeros((n, 3)) if aligned else rng.uniform(-np.pi, np.pi, (n, 3))
    return np.concatenate([centres, sizes, angles], axis=1)


def pairs_per_second(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(pairs per second, mean IoU) of box3d_iou over the rows of a and b."""
    # One pair at a time, as the rewards call it (one completion's boxes against its ground truth).
    start = time.perf_counter()
    total = sum(box3d_iou(x, y) for x, y in zip(a, b))
    elapsed = time.perf_counter() - start
    return len(a) / elapsed, total / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="box pairs per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    # name -> (centre spread in metres, axis-aligned?): a spread of 0.3 m makes almost every pair
    # overlap, 20 m almost none (the early exits that most misses of a young policy take).
    cases = {
        "oriented": (0.3, False),
        "axis-aligned": (0.3, True),
        "disjoint": (20.0, False),
    }
    parts = []  # one "name rate (mean IoU)" entry per case, printed on one line
    for name, (spread, aligned) in cases.items():
        a = random_boxes(rng, args.pairs, spread, aligned)
        b = random_boxes(rng, args.pairs, spread, aligned)
        # the mean IoU shows which regime a case really exercised (near 0 for disjoint)
        rate, mean_iou = pairs_per_second(a, b)
        parts.append(f"{name} {rate:,.0f} pairs/s (mean IoU {mean_iou:.3f})")
    print(f"box3d_iou, {args.pairs} pairs each: " + "; ".join(parts))


if __name__ == "__main__":
    main()
