"""The headline demo's report: the paper's ablation in miniature, and the GRPO reward curve.

3D-RFT's ablation (section 5) compares, on held-out scenes, the SFT model, the SFT model trained
further with SFT for the same extra compute, and the SFT model trained further with GRPO: the gain
comes from RL, not from more passes over the data. `demo.sh` evaluates the three runs with
`eval.py` under several evaluation seeds (each seed draws another subset of held-out records);
this script turns those JSON files into one Markdown table (mean and spread over seeds) and draws
the reward curve of the GRPO run (mean reward and each component per step) as a PNG.

    python report.py --runs sft=runs/sft,sft_more=runs/sft_more,grpo=runs/grpo \
        --grpo-metrics runs/grpo/metrics.jsonl --plot docs/reward_curve.png
    python report.py --runs "SFT=runs/sft,GRPO=runs/grpo_s0+runs/grpo_s1+runs/grpo_s2" ...  (training seeds)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

import eval as evaluation

# =====================================================================================
# The table: mean +- spread over evaluation seeds
# =====================================================================================


def load_run(folder: str) -> list[dict]:
    """Every `eval_seed*.json` a run folder holds (one per evaluation seed)."""
    files = sorted(glob.glob(os.path.join(folder, "eval_seed*.json")))
    if not files:
        raise FileNotFoundError(f"no eval_seed*.json in {folder} (run eval.py --out {folder}/eval_seed0.json ...)")
    return [evaluation.load_results(f) for f in files]


def seed_table(runs: dict[str, list[dict]], metrics: list[str] | None = None) -> str:
    """Markdown: one row per run, each cell "mean (min-max)" in percent over the seeds."""
    per_run = {name: [evaluation.summary(r) for r in results] for name, results in runs.items()}
    first = next(iter(per_run.values()))[0]
    metrics = metrics or [m for m in first if "/" in m]
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "| --- | ---: |" + " ---: |" * len(metrics)]
    for name, rows in per_run.items():
        cells = []
        for metric in metrics:
            values = 100 * np.array([row.get(metric, np.nan) for row in rows])
            cells.append(f"{values.mean():.1f} ({values.min():.1f}-{values.max():.1f})")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_seed_table(arms: dict[str, list[list[dict[str, float]]]], metric: str) -> str:
    """Markdown: one row per arm of several training runs, "mean (lowest-highest run)" in percent.

    `arms`: per arm, per training run, the `eval.summary` of each evaluation seed. Each training
    run is first averaged over its evaluation seeds; the row then shows the mean of
    those run means and the lowest and highest run. The spread between training runs is what a
    claim "GRPO beats SFT" has to clear, not the (smaller) spread over evaluation seeds.

    >>> run = lambda *v: [{"detection/F1@0.25": x} for x in v]   # one summary per evaluation seed
    >>> print(training_seed_table({"GRPO": [run(0.11, 0.13), run(0.14)]}, "detection/F1@0.25"))
    | run | training seeds | detection/F1@0.25 |
    | --- | ---: | ---: |
    | GRPO | 2 | 13.0 (12.0-14.0) |
    """
    lines = [f"| run | training seeds | {metric} |", "| --- | ---: | ---: |"]
    for name, runs in arms.items():
        means = 100 * np.array([np.mean([row.get(metric, np.nan) for row in rows]) for rows in runs])
        lines.append(f"| {name} | {len(runs)} | {means.mean():.1f} ({means.min():.1f}-{means.max():.1f}) |")
    return "\n".join(lines)


# =====================================================================================
# The reward curve, drawn with Pillow (no plotting library needed)
# =====================================================================================

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def read_curves(path: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per-step series of `reward` and every `reward/<component>` from a GRPO metrics.jsonl."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key == "reward" or key.startswith("reward/"):
                    steps, values = curves.setdefault(key, ([], []))
                    steps.append(row["step"])
                    values.append(value)
    return curves


def smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving average (the raw per-step reward is noisy with few prompts per step)."""
    v = np.asarray(values, dtype=float)
    return np.array([v[max(0, i - window + 1):i + 1].mean() for i in range(len(v))])


def plot_curves(curves: dict, out_path: str, title: str, window: int = 5, size=(720, 420)) -> None:
    """A line chart: x = GRPO step, y = reward, one line per series, a legend, light grid."""
    from PIL import Image, ImageDraw

    width, height = size
    # Margins in pixels around the plot area: y labels on the left, the legend on the right.
    left, right, top, bottom = 60, 180, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    all_steps = [s for steps, _ in curves.values() for s in steps]
    all_values = [v for _, values in curves.values() for v in smooth(values, window)]
    # Axis ranges: x spans the logged steps (at least one step wide, so one point still draws);
    # y starts at 0 (rewards are >= 0) and ends at the next half unit above the largest value.
    x0, x1 = min(all_steps), max(max(all_steps), min(all_steps) + 1)
    y0, y1 = 0.0, max(1.0, float(np.ceil(max(all_values) * 2) / 2))

    def xy(step: float, value: float) -> tuple[float, float]:
        """Data coordinates -> pixels (image y grows downwards)."""
        return (left + (step - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (value - y0) / (y1 - y0) * (height - top - bottom))

    for k in range(6):  # horizontal grid and y labels
        value = y0 + k * (y1 - y0) / 5
        _, y = xy(x0, value)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{value:.2f}", fill="black")
    for k in range(6):  # x labels
        step = x0 + k * (x1 - x0) / 5
        x, _ = xy(step, y0)
        draw.text((x - 8, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    # One smoothed line per series (the total thicker), and its legend entry on the right.
    for i, (name, (steps, values)) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [xy(s, v) for s, v in zip(steps, smooth(values, window))]
        draw.line(points, fill=colour, width=3 if name == "reward" else 2)
        draw.line([(width - right + 12, top + 12 + 18 * i), (width - right + 32, top + 12 + 18 * i)], fill=colour, width=3)
        draw.text((width - right + 38, top + 6 + 18 * i), name, fill="black")
    # Title above the plot area, the x-axis name below it.
    draw.text((left, 12), title, fill="black")
    draw.text(((left + width - right) // 2 - 20, height - 22), "GRPO step", fill="black")
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    image.save(out_path)


# =====================================================================================
# Command line
# =====================================================================================


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", required=True,
                   help="name=folder pairs, comma separated, in table order; name=f1+f2+f3 for an arm of several "
                        "training runs (adds a table of the first metric over them)")
    p.add_argument("--metrics", default=None, help="comma-separated summary keys to show (default: all)")
    p.add_argument("--grpo-metrics", default=None, help="a GRPO metrics.jsonl to plot")
    p.add_argument("--plot", default="docs/reward_curve.png", help="where the reward curve PNG goes")
    p.add_argument("--smooth", type=int, default=5, help="moving-average window of the plotted curves (steps)")
    args = p.parse_args(argv)
    # Missing files and malformed results end in one line, not a traceback.
    try:
        # "name=folder" pairs keep the order given: it is the table's row order.
        # An arm may name several training runs, "name=folder+folder+...": the first table shows
        # each arm's first run over its evaluation seeds, the second every run's mean.
        arms = {}
        for item in args.runs.split(","):
            name, _, folders = item.partition("=")
            arms[name.strip()] = [load_run(folder.strip()) for folder in folders.split("+")]
        summaries = {name: [[evaluation.summary(r) for r in results] for results in runs]
                     for name, runs in arms.items()}
        first = next(iter(summaries.values()))[0][0]
        metrics = args.metrics.split(",") if args.metrics else [m for m in first if "/" in m]
        print(seed_table({name: runs[0] for name, runs in arms.items()}, metrics))
        if any(len(runs) > 1 for runs in arms.values()):
            print("\n" + training_seed_table(summaries, metrics[0]))  # the first metric: the headline
        if args.grpo_metrics:
            if not os.path.exists(args.grpo_metrics):
                raise FileNotFoundError(f"GRPO metrics not found: {args.grpo_metrics}")
            plot_curves(read_curves(args.grpo_metrics), args.plot, f"GRPO reward (moving average over {args.smooth} steps)",
                        window=args.smooth)
            print(f"\nreward curve -> {args.plot}")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
