"""report.py: the table over evaluation seeds and the reward-curve PNG."""
import json

import numpy as np
import pytest
from PIL import Image

import report


def fake_results(f1: float) -> dict:
    at = {"f1": f1, "precision": f1, "recall": f1}
    return {"detection": {"@0.25": at, "@0.5": at, "format_rate": 1.0, "num_samples": 4}}


def test_seed_table_mean_and_range():
    runs = {"SFT": [fake_results(0.1), fake_results(0.3)], "GRPO": [fake_results(0.5)] * 3}
    table = report.seed_table(runs, ["detection/F1@0.25"])
    assert "| SFT | 2 | 20.0 (10.0-30.0) |" in table
    assert "| GRPO | 3 | 50.0 (50.0-50.0) |" in table


def test_reward_curve_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        for step in range(12):
            f.write(json.dumps({"step": step, "reward": step / 10, "reward/iou": step / 20, "loss": 0.1}) + "\n")
    curves = report.read_curves(str(path))
    assert set(curves) == {"reward", "reward/iou"} and curves["reward"][0] == list(range(12))
    assert report.smooth([0, 2, 4], 2).tolist() == [0, 1, 3]
    report.plot_curves(curves, str(tmp_path / "curve.png"), "test")
    image = np.asarray(Image.open(tmp_path / "curve.png"))
    assert image.shape == (420, 720, 3) and (image != 255).any()


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no eval_seed"):
        report.main(["--runs", f"A={tmp_path}"])


def test_training_seed_table_from_the_command_line(tmp_path, capsys):
    # Two GRPO training runs (each with 2 evaluation seeds) and one SFT run: the first table shows
    # each arm's first run over its evaluation seeds, the second each arm's run means.
    values = {"sft": [0.10, 0.12], "g0": [0.12, 0.14], "g1": [0.16, 0.18]}
    for run, seeds in values.items():
        (tmp_path / run).mkdir()
        for k, v in enumerate(seeds):
            (tmp_path / run / f"eval_seed{k}.json").write_text(json.dumps(fake_results(v)))
    report.main(["--runs", f"SFT={tmp_path / 'sft'},GRPO={tmp_path / 'g0'}+{tmp_path / 'g1'}",
                 "--metrics", "detection/F1@0.25"])
    out = capsys.readouterr().out
    assert "| GRPO | 2 | 13.0 (12.0-14.0) |" in out            # run g0 over its 2 evaluation seeds
    assert "| GRPO | 2 | 15.0 (13.0-17.0) |" in out            # the means of g0 (13) and g1 (17)
    assert "| SFT | 1 | 11.0 (11.0-11.0) |" in out
