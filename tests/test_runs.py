"""Nothing lost, nothing silent: run folders, locks, interrupted checkpoint writes, bad flags.

What the training scripts promise (README, "Bad input and interrupted runs"):
- a folder holding a run is never replaced without --resume or --overwrite, and stays byte for byte;
- a second run on a folder that a live run holds is refused, naming its pid; a killed run's lock is
  taken over;
- a process killed at any instant of a checkpoint write resumes to the same weights as a run that
  was never interrupted;
- every bad flag is a one-line usage error (exit 2) before anything loads.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.test_model_data import make_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
SFT = ["--batch-size", "4", "--micro-batch", "2", "--log-every", "1", "--no-progress", "--lr", "1e-3",
       "--warmup", "1", "--save-every", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runsdata")
    make_records(root / "train", n=6)
    return str(root)


def sft_args(data_dir, out, steps):
    return ["--data", data_dir, "--out", str(out), "--steps", str(steps)] + SFT


def run_sft(args, prelude=""):
    """sft.main(args) in a fresh process; `prelude` is Python run first (e.g. to plant a crash)."""
    code = f"import sys; sys.path.insert(0, {ROOT!r})\n{prelude}\nimport sft\nsft.main({args!r})\n"
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT)


def folder_digest(folder) -> dict:
    """Every file under `folder` with the sha256 of its bytes."""
    digest = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            digest[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return digest


def weights(out):
    return load_file(os.path.join(out, "latest", "model.safetensors"))


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 6-step run: what every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    done = run_sft(sft_args(data_dir, out, 6))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------------------------
# run folders
# ---------------------------------------------------------------------------------------------

def test_rerunning_a_finished_run_keeps_it_byte_for_byte(data_dir, reference, tmp_path):
    before = folder_digest(reference)
    again = run_sft(sft_args(data_dir, reference, 6))
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert "already holds a run" in again.stderr and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert folder_digest(reference) == before


def test_overwrite_replaces_the_run(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_sft(sft_args(data_dir, out, 2)).returncode == 0
    replaced = run_sft(sft_args(data_dir, out, 4) + ["--overwrite"])
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert len(losses(out)) == 4  # the old run's log lines are gone, not appended to
    assert json.load(open(out / "latest" / "trainer_state.json"))["step"] == 4
    both = run_sft(sft_args(data_dir, out, 4) + ["--overwrite", "--resume"])
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_a_live_lock_is_refused_and_a_dead_one_taken_over(data_dir, tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    sleeper = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": os.uname().nodename}
        (out / "run.lock").write_text(json.dumps(lock))
        refused = run_sft(sft_args(data_dir, out, 2))
        assert refused.returncode == 1 and f"pid {sleeper.pid}" in refused.stderr
        assert "Traceback" not in refused.stderr and not (out / "metrics.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone now (as after kill -9): its lock is stale and is taken over.
    taken = run_sft(sft_args(data_dir, out, 2))
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert not (out / "run.lock").exists()  # released at exit


def test_out_that_is_a_file_fails_before_loading(data_dir, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    out = run_sft(sft_args(data_dir, path, 2))
    assert out.returncode == 1 and "is a file" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# kills at chosen instants of a checkpoint write, and kill -9 from outside
# ---------------------------------------------------------------------------------------------

# Dies (as kill -9 would: no clean-up, no atexit) right after the Nth call of os.replace whose
# arguments match, i.e. at an exact instant inside runtime.save_checkpoint.
CRASH = """
import os
_real, _seen = os.replace, [0]
def _replace(src, dst):
    _real(src, dst)
    if src.endswith({src!r}) and dst.endswith({dst!r}):
        _seen[0] += 1
        if _seen[0] == {nth}:
            os._exit(137)
os.replace = _replace
"""


def test_kill_between_the_renames_of_a_checkpoint_write_resumes_exactly(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    # The save at step 4 moves latest -> latest.old and dies before latest.tmp -> latest.
    cut = run_sft(sft_args(data_dir, out, 6), CRASH.format(src="latest", dst="latest.old", nth=1))
    assert cut.returncode == 137
    assert not (out / "latest").exists() and (out / "latest.old").exists() and (out / "latest.tmp").exists()
    resumed = run_sft(sft_args(data_dir, out, 6) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "from step 4" in resumed.stdout  # the complete latest.tmp, not the older latest.old
    assert same_weights(weights(out), weights(reference)) and losses(out) == losses(reference)


def test_two_kills_in_a_row_lose_nothing(data_dir, reference, tmp_path):
    """Cut between the renames, resume, and die again while the old copy is removed."""
    out = tmp_path / "run"
    run_sft(sft_args(data_dir, out, 6), CRASH.format(src="latest", dst="latest.old", nth=1))
    # The resumed run's first save (step 6) is cut right after latest.tmp -> latest.
    second = run_sft(sft_args(data_dir, out, 6) + ["--resume"], CRASH.format(src="latest.tmp", dst="latest", nth=1))
    assert second.returncode == 137
    resumed = run_sft(sft_args(data_dir, out, 6) + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(weights(out), weights(reference))


def test_kill_9_from_outside_resumes_exactly(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    code = f"import sys; sys.path.insert(0, {ROOT!r})\nimport sft\nsft.main({sft_args(data_dir, out, 6)!r})\n"
    victim = subprocess.Popen([PYTHON, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "latest").exists():  # the first checkpoint (step 2)
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = run_sft(sft_args(data_dir, out, 6) + ["--resume"])  # its lock is stale, its pid dead
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_weights(weights(out), weights(reference)) and losses(out) == losses(reference)


# ---------------------------------------------------------------------------------------------
# bad flags: usage errors (exit 2) before anything loads
# ---------------------------------------------------------------------------------------------

BAD_FLAGS = {
    "sft": [["--min-lr-ratio", "-0.1"], ["--min-lr-ratio", "2"], ["--warmup", "-1"], ["--grad-clip", "-1"],
            ["--lr", "-1e-3"], ["--lr", "0"], ["--lr", "nan"], ["--weight-decay", "-0.1"], ["--tasks", ","],
            ["--steps", "0"], ["--max-seconds", "0"], ["--max-seconds", "nan"]],
    "grpo": [["--eps", "-0.1"], ["--eps", "1.5"], ["--beta", "-0.04"], ["--lr", "-1"], ["--temperature", "nan"],
             ["--temperature", "0"], ["--grad-clip", "-1"], ["--weight-decay", "-1"], ["--warmup", "-2"],
             ["--reward", ",,,"], ["--reward", "format=0"], ["--reward", "format=1,frame=1"],
             ["--task", "spatial", "--reward", "iou=1"], ["--group-size", "1"], ["--mu", "0"], ["--eps-high", "inf"]],
    "eval": [["--max-new-tokens", "0"], ["--batch-size", "-1"], ["--tasks", ","], ["--limit", "0"],
             ["--samples", "-1"], ["--seed", "0,0"], ["--seed", "1,x"]],
}
# --geometry / --geometry-dim (runtime.add_model_arguments, shared by the three scripts): a size needs on
GEOMETRY_FLAGS = [["--geometry-dim", "3"], ["--geometry", "off", "--geometry-dim", "3"], ["--geometry-dim", "0"],
                  ["--geometry", "sometimes"]]
for _cases in BAD_FLAGS.values():
    _cases.extend(GEOMETRY_FLAGS)
CASES = [(script, flags) for script, cases in BAD_FLAGS.items() for flags in cases]


@pytest.mark.parametrize("script, flags", CASES, ids=[f"{s}{' '.join(f)}" for s, f in CASES])
def test_bad_flags_are_usage_errors(script, flags, capsys, monkeypatch, tmp_path):
    import eval as evaluation
    import grpo
    import sft

    main = {"sft": sft.main, "grpo": grpo.main, "eval": evaluation.main}[script]
    # Nothing may load before the flags are checked.
    monkeypatch.setattr("model.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        main(flags + ["--out", str(tmp_path / "out")] if script != "eval" else flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"{script}.py: error: ") or "error:" in err[-1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device", ["mps", "meta"])
def test_unsupported_devices_are_one_line(device):
    import runtime

    with pytest.raises(SystemExit, match="only cpu and cuda"):
        runtime.resolve_device(device)


def test_eval_out_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    import eval as evaluation

    make_records(tmp_path / "data" / "val", n=2)
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(evaluation.model_lib, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for out, message, seeds in [(tmp_path, "is a folder", "0"), (tmp_path / "file" / "eval.json", "is a file", "0"),
                                (tmp_path / "eval.json", "put {seed} in its name", "0,1")]:
        with pytest.raises(SystemExit, match=message):
            evaluation.main(["--data", str(tmp_path / "data"), "--out", str(out), "--seed", seeds])


# ---------------------------------------------------------------------------------------------
# bad data and broken checkpoints: one line, exit 1, from the scripts themselves
# ---------------------------------------------------------------------------------------------

def spoil(folder, how: str) -> None:
    """Damage the first record of folder/val/detection.jsonl (made by make_records) one way."""
    import numpy as np
    from PIL import Image

    path = folder / "val" / "detection.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    box = record["boxes"][0]
    if how == "8 numbers":
        box["bbox_3d"] = box["bbox_3d"][:8]
    elif how == "NaN":
        box["bbox_3d"][0] = float("nan")
    elif how == "negative size":
        box["bbox_3d"][3] = -0.5
    elif how == "integer label":
        box["label"] = 7
    elif how == "boxes null":
        record["boxes"] = None
    elif how == "missing image":
        record["images"][0] = "frames/none.png"
    elif how == "corrupt PNG":
        (folder / "val" / record["images"][0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    elif how == "3x3 image":
        Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(folder / "val" / record["images"][0])
    elif how == "geometry shape":
        np.save(folder / "val" / record["geometry"], np.zeros((2, 8, 8, 4), np.float32))
    elif how == "invalid UTF-8":
        path.write_bytes(path.read_bytes().replace(b"chair", b"ch\xffir", 1))
        return
    lines[0] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n")


DATA_CASES = ["8 numbers", "NaN", "negative size", "integer label", "boxes null", "missing image",
              "corrupt PNG", "3x3 image", "geometry shape", "invalid UTF-8"]


@pytest.mark.parametrize("how", DATA_CASES)
def test_bad_records_are_one_line_before_any_model_loads(how, tmp_path, monkeypatch):
    import eval as evaluation

    make_records(tmp_path / "val", n=2)
    spoil(tmp_path, how)
    monkeypatch.setattr(evaluation.model_lib, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--data", str(tmp_path), "--no-progress"])
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "detection.jsonl" in message or "val" in message  # names the file


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "missing", "bad config"])
def test_broken_checkpoints_are_one_line(damage, tmp_path):
    import model

    net, tokenizer, cfg = model.load_model("toy")
    model.save_model(net, tokenizer, cfg, str(tmp_path / "ckpt"))
    weights = tmp_path / "ckpt" / "model.safetensors"
    if damage == "random bytes":
        weights.write_bytes(os.urandom(4096))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "missing":
        weights.unlink()
    else:
        (tmp_path / "ckpt" / "config.json").write_text("{not json")
    # The data folder is checked first: give it records, so that the checkpoint is what fails.
    make_records(tmp_path / "data" / "val", n=1)
    out = subprocess.run([PYTHON, os.path.join(ROOT, "eval.py"), "--model", str(tmp_path / "ckpt"),
                          "--data", str(tmp_path / "data"), "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "ckpt" in lines[0], lines
