"""Throughput of the exact 3D IoU in boxes.py (pairs per second, one process), and its parity.

    python bench_iou.py                     # all four figures, ~20 s
    python bench_iou.py --parity-pairs 2000 # a quicker parity check

Four figures, on the batched `iou_matrix` unless said otherwise:
  (a) a GRPO detection step: 64 completions x ~25 predicted boxes against the ~25 true boxes
      of one room, one `iou_matrix` call per completion as rewards.py makes them (and, for
      comparison, all 64 stacked into one call). Predictions are noisy copies of true boxes
      plus random ones, so most pairs are disjoint and some overlap;
  (b) all-overlapping oriented pairs (centres within 0.3 m): the clipping path;
  (c) the scalar reference `box3d_iou` on a smaller sample of (b), one pair at a time;
  (d) parity: max |batched - scalar| over random pairs that include touching, nested,
      identical, thin (one extent 1e-6), coplanar-face and quarter-turn cases.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import numpy as np

from boxes import box3d_iou, box_rotation, iou_matrix, iou_pairs, rotation_to_euler_zxy


def random_boxes(rng: np.random.Generator, n: int, spread: float, aligned: bool = False,
                 ) -> np.ndarray:
    """n random 9-number boxes with centres in [-spread, spread]^3, sizes 0.3-2 m."""
    centres = rng.uniform(-spread, spread, (n, 3))
    sizes = rng.uniform(0.3, 2.0, (n, 3))          # metres, as indoor furniture
    angles = np.zeros((n, 3)) if aligned else rng.uniform(-np.pi, np.pi, (n, 3))
    return np.concatenate([centres, sizes, angles], axis=1)


ROOM_LO, ROOM_HI = np.array([-3.0, -1.3, 1.0]), np.array([3.0, 1.3, 7.0])  # camera frame, m
TILT = 0.3                                          # the camera's downward tilt, radians


def room_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n upright boxes anywhere in the room, as scenes.py's camera frame has them.

    yaw 0, roll = the camera tilt, pitch = the object's heading in [-pi/4, pi/4].
    """
    angles = np.stack([np.zeros(n), np.full(n, TILT), rng.uniform(-np.pi / 4, np.pi / 4, n)], 1)
    return np.concatenate([rng.uniform(ROOM_LO, ROOM_HI, (n, 3)), rng.uniform(0.3, 2.0, (n, 3)),
                           angles], axis=1)


def room_step(rng: np.random.Generator, completions: int = 64, boxes: int = 25,
              ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(true boxes (G, 9), one (P, 9) prediction array per completion) for one 6 x 6 m room.

    Each completion predicts boxes +- 5 boxes: 70% noisy copies of true boxes (centre +-0.15 m,
    sizes +-20%, heading +-0.2 rad), 30% random boxes anywhere in the room.
    """
    gt = room_boxes(rng, boxes)
    preds = []
    for _ in range(completions):
        n = int(rng.integers(boxes - 5, boxes + 6))
        copies = gt[rng.integers(0, boxes, int(0.7 * n))].copy()
        copies[:, :3] += rng.normal(0.0, 0.15, (len(copies), 3))
        copies[:, 3:6] *= rng.uniform(0.8, 1.2, (len(copies), 3))
        copies[:, 8] += rng.normal(0.0, 0.2, len(copies))
        preds.append(np.concatenate([copies, room_boxes(rng, n - len(copies))]))
    return gt, preds


def _turned(box: np.ndarray, axis: int, angle: float) -> np.ndarray:
    """The box turned by `angle` about its own local `axis` (centre and sizes kept)."""
    local = np.eye(3)
    i, j = [k for k in range(3) if k != axis]
    c, s = np.cos(angle), np.sin(angle)
    local[i, i], local[i, j], local[j, i], local[j, j] = c, -s, s, c
    return np.array([*box[:6], *rotation_to_euler_zxy(box_rotation(*box[6:9]) @ local)])


def parity_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n box pairs (a, b), (n, 9) each: one of thirteen kinds per pair, special cases included.

    Kinds: general overlapping, general anywhere, axis-aligned, identical, nested, touching
    face to face (same rotation, shifted by the half extents along an own axis), touching by an
    edge, coplanar faces (b turned about a's axis k and moved so the +k faces share a plane),
    thin (one extent 1e-6) against a box or against a coplanar copy of itself, quarter turns
    (the same or a shifted box described with swapped extents), and b turned about a's axis k
    and stacked on a's +k face, touching or sunk 1 mm into it.
    """
    a, b = random_boxes(rng, n, 0.3), random_boxes(rng, n, 0.3)
    kind = rng.integers(0, 13, n)
    for p in range(n):
        x, k = a[p], int(rng.integers(0, 3))
        axes = box_rotation(*x[6:9])                 # columns: x's local axes
        if kind[p] == 0:                             # general, overlapping: as drawn
            continue
        if kind[p] == 1:                             # anywhere: mostly disjoint
            b[p, :3] = x[:3] + rng.uniform(-2.0, 2.0, 3)
        elif kind[p] == 2:                           # axis-aligned
            a[p, 6:], b[p, 6:] = 0.0, 0.0
        elif kind[p] == 3:                           # identical
            b[p] = x
        elif kind[p] == 4:                           # nested: b turned anyhow, small enough
            b[p, 3:6] = x[3:6].min() * rng.uniform(0.1, 0.55, 3)
            b[p, :3] = x[:3] + axes @ rng.uniform(-0.1, 0.1, 3) * x[3:6]
        elif kind[p] in (5, 6):                      # touching by a face, or by an edge
            b[p, 6:] = x[6:]
            shift = rng.uniform(-0.3, 0.3, 3) * x[3:6]
            shift[k] = (x[3 + k] + b[p, 3 + k]) / 2.0
            if kind[p] == 6:
                m = (k + 1) % 3
                shift[m] = (x[3 + m] + b[p, 3 + m]) / 2.0
            b[p, :3] = x[:3] + axes @ shift
        elif kind[p] == 7:                           # coplanar +k faces, b turned about axis k
            b[p] = _turned(x, k, rng.uniform(-np.pi, np.pi))
            b[p, 3:6] = x[3:6] * rng.uniform(0.5, 1.5, 3)
            shift = rng.uniform(-0.3, 0.3, 3) * x[3:6]
            shift[k] = (x[3 + k] - b[p, 3 + k]) / 2.0
            b[p, :3] = x[:3] + axes @ shift
        elif kind[p] == 8:                           # thin against a general box
            a[p, 3 + k] = 1e-6
        elif kind[p] == 9:                           # thin against its own coplanar copy
            a[p, 3 + k] = 1e-6
            b[p] = a[p]
            shift = rng.uniform(-0.5, 0.5, 3) * a[p, 3:6]
            shift[k] = 0.0
            b[p, :3] = a[p, :3] + axes @ shift
        elif kind[p] == 10:                          # a quarter turn with swapped extents
            b[p] = _turned(x, k, np.pi / 2)
            i, j = [m for m in range(3) if m != k]
            b[p, 3 + i], b[p, 3 + j] = x[3 + j], x[3 + i]
            if rng.random() < 0.5:
                b[p, :3] += rng.uniform(-0.3, 0.3, 3)
        elif kind[p] >= 11:                          # stacked: b turned about axis k, on a's
            b[p] = _turned(x, k, rng.uniform(-np.pi, np.pi))       # +k face (touching), or
            b[p, 3:6] = x[3:6] * rng.uniform(0.5, 1.5, 3)          # sunk into it by 1e-3
            shift = rng.uniform(-0.3, 0.3, 3) * x[3:6]
            shift[k] = (x[3 + k] + b[p, 3 + k]) / 2.0 - (1e-3 if kind[p] == 12 else 0.0)
            b[p, :3] = x[:3] + axes @ shift
    return a, b


def timed(fn: Callable[..., object], *args: object) -> float:
    """Seconds taken by fn(*args) (best of 5, the machine may be busy)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--overlap-boxes", type=int, default=150,
                        help="(b): an N x N matrix of overlapping boxes")
    parser.add_argument("--scalar-pairs", type=int, default=500, help="(c): scalar pairs")
    parser.add_argument("--parity-pairs", type=int, default=10_000, help="(d): checked pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          "(a), (b): best of 5 runs, wall clock")

    # (a) one detection step: one iou_matrix per completion, then all stacked in one call
    gt, preds = room_step(rng)
    pairs = sum(len(p) for p in preds) * len(gt)
    per_call = timed(lambda: [iou_matrix(p, gt) for p in preds])
    stacked = timed(iou_matrix, np.concatenate(preds), gt)
    # R_IoU passes lists of {"label", "bbox_3d": [9 floats]} dicts, parsed anew each call
    dicts = [[{"label": "x", "bbox_3d": box} for box in p.tolist()] for p in [gt, *preds]]
    as_dicts = timed(lambda: [iou_matrix(p, dicts[0]) for p in dicts[1:]])
    overlapping = float(np.mean(iou_matrix(np.concatenate(preds), gt) > 0))
    print(f"(a) detection step, {pairs:,} pairs ({overlapping:.1%} overlapping): "
          f"{pairs / per_call:,.0f} pairs/s per completion call ({pairs / as_dicts:,.0f} "
          f"with lists of dicts), {pairs / stacked:,.0f} in one stacked call")

    # (b) overlapping oriented boxes (centres within 0.3 m), one N x N matrix
    a, b = random_boxes(rng, args.overlap_boxes, 0.3), random_boxes(rng, args.overlap_boxes, 0.3)
    seconds = timed(iou_matrix, a, b)
    ious = iou_matrix(a, b)
    print(f"(b) overlapping oriented, {ious.size:,} pairs ({np.mean(ious > 0):.1%} overlapping, "
          f"mean IoU {ious.mean():.3f}): {ious.size / seconds:,.0f} pairs/s")

    # (c) the scalar reference, one pair at a time, on pairs like (b)
    a, b = random_boxes(rng, args.scalar_pairs, 0.3), random_boxes(rng, args.scalar_pairs, 0.3)
    start = time.perf_counter()
    for x, y in zip(a, b):
        box3d_iou(x, y)
    print(f"(c) scalar box3d_iou, {len(a):,} overlapping pairs: "
          f"{len(a) / (time.perf_counter() - start):,.0f} pairs/s")

    # (d) parity with the scalar path, special cases included
    a, b = parity_pairs(rng, args.parity_pairs)
    batched = iou_pairs(a, b)
    scalar = np.array([box3d_iou(x, y) for x, y in zip(a, b)])
    worst = int(np.argmax(np.abs(batched - scalar)))
    print(f"(d) parity over {len(a):,} pairs: max |batched - scalar| = "
          f"{abs(batched[worst] - scalar[worst]):.2e} (pair {worst}); "
          f"{np.mean(scalar > 0):.1%} overlap, {np.sum(scalar == 1.0)} identical")


if __name__ == "__main__":
    main()
