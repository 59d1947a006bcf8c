"""SFT: one step on 2 processes equals one step on 1; an interrupted run resumes exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.test_model_data import make_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
COMMON = ["--batch-size", "4", "--micro-batch", "2", "--log-every", "1", "--no-progress", "--lr", "1e-3", "--warmup", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sftdata")
    make_records(root / "train", n=6)
    return str(root)


TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2"]
DEADLINE_S = 300  # a 2-process toy run takes 10-30 s here; a hang in gloo's teardown must not stall CI


def run_until_deadline(command: list, deadline_s: float = DEADLINE_S) -> subprocess.CompletedProcess:
    """Run a command (torchrun and its workers in a session of their own) and fail, not hang.

    One thread per process (torchrun's default for its workers): the tests compare weights bit
    for bit, and at two threads, even with MKL_CBWR (docs/DESIGN.md section 8), a resumed run
    once ended with other weights in the last bits than the uninterrupted run.

    A 2-process run once hung in teardown (one rank waiting in a futex after the other had left):
    past the deadline the whole process group is killed, workers included, and the test fails
    with the output so far.
    """
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... still running after {deadline_s} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run(args, torchrun=False):
    launcher = TORCHRUN if torchrun else [PYTHON]
    out = run_until_deadline(launcher + [os.path.join(ROOT, "sft.py")] + args)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def weights(run_dir):
    return load_file(os.path.join(run_dir, "latest", "model.safetensors"))


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_two_processes_match_one(data_dir, tmp_path):
    args = ["--data", data_dir, "--steps", "2"] + COMMON
    run(args + ["--out", str(tmp_path / "one")])
    run(args + ["--out", str(tmp_path / "two")], torchrun=True)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = make_start_weights(tmp_path / "start")
    moved = 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(a[name], start[name]))
    assert moved > 10  # the step really changed the model
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-5)


def make_start_weights(folder):
    """The toy model's initial weights, saved the way checkpoints save them."""
    import model

    net, tokenizer, cfg = model.load_model("toy")
    model.save_model(net, tokenizer, cfg, str(folder))
    return load_file(os.path.join(folder, "model.safetensors"))


def test_resume_is_exact(data_dir, tmp_path):
    args = ["--data", data_dir, "--steps", "4", "--save-every", "2"] + COMMON
    run(args + ["--out", str(tmp_path / "full")])
    run(args + ["--out", str(tmp_path / "cut"), "--stop-after", "2"])
    run(args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_max_seconds_ends_every_process_at_the_same_step_with_a_checkpoint(data_dir, tmp_path):
    """--max-seconds: loading alone outlasts 0.01 s, so the run ends after its first step, with
    the checkpoint and log line a --stop-after 1 run writes, and 2 processes stop together."""
    args = ["--data", data_dir, "--steps", "50", "--save-every", "0"] + COMMON
    run(args + ["--out", str(tmp_path / "cut"), "--stop-after", "1"])
    out = run(args + ["--out", str(tmp_path / "timed"), "--max-seconds", "0.01"])
    assert "--max-seconds 0.01 reached after 1 steps" in out.stdout
    run(args + ["--out", str(tmp_path / "timed2"), "--max-seconds", "0.01"], torchrun=True)
    for folder in ("timed", "timed2"):
        with open(tmp_path / folder / "latest" / "trainer_state.json") as f:
            assert json.load(f)["step"] == 1
        assert len(losses(tmp_path / folder)) == 1
        a, b = weights(tmp_path / "cut"), weights(tmp_path / folder)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_resume_refuses_changed_settings_but_not_bookkeeping():
    import runtime

    saved = {"lr": 0.003, "steps": 4, "tasks": ["detection"], "log_every": 10, "model": "toy"}
    # Bookkeeping flags, a flag the caller frees (also_free) and a tuple saved as a list all pass.
    runtime.check_resume_args(saved, {**saved, "tasks": ("detection",), "log_every": 1, "model": "x",
                                      "new_flag": 1}, also_free=("model",))
    with pytest.raises(SystemExit, match=r"--lr 0.001 \(checkpoint: 0.003\); --steps 8 \(checkpoint: 4\)"):
        runtime.check_resume_args(saved, {**saved, "lr": 0.001, "steps": 8}, also_free=("model",))


def test_cli_errors_are_one_line(tmp_path):
    # Its own --out: the default runs/sft may hold a run in a work tree, which is refused first.
    out = subprocess.run([PYTHON, os.path.join(ROOT, "sft.py"), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "records not found" in out.stderr
    out = subprocess.run([PYTHON, os.path.join(ROOT, "sft.py"), "--tasks", "dance"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "unknown task" in out.stderr and "Traceback" not in out.stderr
    help_text = subprocess.run([PYTHON, os.path.join(ROOT, "sft.py"), "--help"], capture_output=True, text=True).stdout
    for flag in ("--steps", "--lr", "--resume", "--micro-batch", "--grad-clip", "--warmup", "--tasks", "--geometry"):
        assert flag in help_text


def test_answer_loss_from_the_suffix_equals_the_full_loss(tmp_path):
    """SFT asks the model for the answer span's logits only; the loss must not change."""
    import data
    import model
    import sft
    net, tokenizer, cfg = model.load_model("toy")
    records = make_records(tmp_path, n=2)
    records[1]["conversations"][1]["value"] = data.detection_answer(
        [{"label": "table", "bbox_3d": [0.5, 0.2, 3, 1.2, 0.7, 0.8, 0.1, 0, 0]}] * 3)  # a longer answer
    batch = data.collate(records, tokenizer, cfg)
    mask = batch["loss_mask"].clone()
    mask[0, mask[0].bool().nonzero()[:3]] = 0          # row 0's answer starts later than row 1's
    keep = sft.logits_needed(mask)
    assert 0 < keep < mask.shape[1] - 64                 # the visual tokens and prompt are skipped
    with torch.no_grad():
        full = sft.answer_token_loss(net(**batch), batch["input_ids"], mask)
        suffix = sft.answer_token_loss(net(**batch, logits_to_keep=keep), batch["input_ids"], mask)
        too_short = sft.answer_token_loss(net(**batch, logits_to_keep=keep - 1), batch["input_ids"], mask)
    assert suffix.item() == pytest.approx(full.item(), rel=1e-5)
    assert too_short.item() < full.item() - 1e-3        # one position fewer drops a scored token
    assert sft.logits_needed(torch.zeros_like(mask)) == 0


def test_device_flag_errors_are_one_line(monkeypatch):
    import runtime
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="'gpu' is not a device"):
        runtime.setup_distributed("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit, match=f"--device {device}, but this machine has no usable CUDA GPU"):
            runtime.setup_distributed(device)
    assert runtime.setup_distributed("auto").device == torch.device("cpu")


def test_a_hung_run_fails_at_its_deadline_with_its_workers_killed(tmp_path):
    """The 2-process tests' guard: a launcher whose worker hangs fails the test and leaves no process."""
    pid_file = tmp_path / "worker.pid"
    # A "launcher" that starts a worker sleeping far past the deadline, then waits for it.
    hang = (f"import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pid_file)!r}, 'w').write(str(w.pid)); print('started', flush=True); w.wait()")
    with pytest.raises(pytest.fail.Exception, match="still running after 3 s"):
        run_until_deadline([PYTHON, "-c", hang], deadline_s=3)
    worker = int(pid_file.read_text())
    time.sleep(0.2)
    assert process_state(worker) in (None, "Z")  # gone, or dead and waiting for its parent to reap it


def process_state(pid: int) -> str | None:
    """One letter from /proc/PID/stat (R running, S sleeping, Z dead, ...), None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
