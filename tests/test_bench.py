"""bench.py's project half on a tiny real-class checkpoint (TRL is not needed and not imported).

One step of the project with all three once-per-group optimisations switched off, as bench.py
writes them: every phase is timed and the phases add up to the step, exactly N tokens are
sampled, bench.py's per-row scoring agrees with grpo's shared prompt pass, and grpo's functions
are put back afterwards.
"""
import grpo
import bench
from tests.real_checkpoint import make_hub_checkpoint, make_records


def test_project_half(tmp_path):
    checkpoint = make_hub_checkpoint(tmp_path / "qwen", layers=1, hidden=128)
    make_records(tmp_path / "data" / "train", n=1, frames=2, size=56)
    cfg = {"checkpoint": checkpoint, "data": str(tmp_path / "data"), "work": str(tmp_path), "prompts": 1,
           "group_size": 2, "new_tokens": 3, "micro_batch": 2, "beta": 0.04, "lr": 1e-5, "temperature": 1.0,
           "seed": 0, "steps": 1, "warmup": 0, "threads": None}
    names = ("rollout", "update_policy", "completion_logprobs", "sample_groups", "prepare_prompt", "score")
    before = {name: getattr(grpo, name) for name in names}
    result = bench.project_worker(cfg, "all")
    (step,) = result["steps"]
    assert set(step) == {*bench.PHASES, "step"}
    assert min(step[k] for k in ("rollout", "policy", "reference", "optimiser")) > 0
    assert abs(sum(step[k] for k in bench.PHASES) - step["step"]) < 1e-6
    info = result["info"]
    assert info["completion_tokens"] == [3, 3] and info["rows"] == 2 and result["peak_rss_mb"] > 0
    assert info["per_row_vs_shared_max_abs_logp_diff"] < 1e-4
    assert {name: getattr(grpo, name) for name in names} == before  # the patches are undone
