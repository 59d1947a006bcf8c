"""The real-data path end to end: the real Qwen2.5-VL class in the hub's layout, the published
record files as they are, and sft.py / grpo.py (with and without LoRA) / eval.py on each, in bf16
on the CPU.

The checkpoint is tiny (2 layers, width 64) but real where it matters: flat config.json, sharded
safetensors with tied embeddings, Qwen's token ids and vocabulary of 151,936, the shipped
preprocessor_config.json. The records are written as VG LLM and VSI-Bench publish them
(tests/test_formats.py builds them).
"""
import json
import os

import pytest
from safetensors.torch import load_file

import eval as evaluation
import grpo
import sft
from tests import real_checkpoint
from tests.test_formats import scanrefer, vg_detection, vsibench  # noqa: F401  (pytest fixtures)

COMMON = ["--dtype", "bfloat16", "--no-progress", "--num-frames", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return real_checkpoint.make_hub_checkpoint(tmp_path_factory.mktemp("hub"), layers=2, hidden=64)


def sources(name, vg_detection, scanrefer, vsibench):  # noqa: F811
    """(task, training file, evaluation file, media root) of one published format."""
    if name == "vg_llm_detection":
        path, media, _ = vg_detection
        return "detection", path, path, media
    if name == "scanrefer":
        val, train, media, _ = scanrefer
        return "grounding", train, val, media
    path, media = vsibench
    return "spatial", path, path, media


@pytest.mark.parametrize("name", ["vg_llm_detection", "scanrefer", "vsi_bench"])
def test_sft_grpo_eval_on_a_published_file(name, checkpoint, vg_detection, scanrefer, vsibench, tmp_path):  # noqa: F811
    task, train_file, eval_file, media = sources(name, vg_detection, scanrefer, vsibench)
    data = ["--data", train_file, "--media-root", media]
    sft.main(["--model", checkpoint, "--tasks", task, "--out", str(tmp_path / "sft"), "--steps", "2",
              "--batch-size", "2", "--micro-batch", "1", *data, *COMMON])
    state = json.load(open(tmp_path / "sft" / "latest" / "trainer_state.json"))
    assert state["step"] == 2
    grpo_args = ["--task", task, "--steps", "2", "--prompts-per-step", "1", "--group-size", "2",
                 "--max-new-tokens", "8", "--micro-batch", "2", "--lr", "1e-4", *data, *COMMON]
    for variant, extra in [("full", []), ("lora", ["--lora-rank", "4"])]:
        out = tmp_path / f"grpo_{variant}"
        grpo.main(["--init", str(tmp_path / "sft" / "latest"), "--out", str(out), *grpo_args, *extra])
        lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert [line["step"] for line in lines] == [0, 1] and all("truncated" in line for line in lines)
        saved = os.listdir(out / "latest")
        assert ("adapter_model.safetensors" in saved) == (variant == "lora")
    # The full fine-tuning run trains fp32 master weights (bf16 autocast) and saves them so.
    weights = load_file(str(tmp_path / "grpo_full" / "latest" / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    results = tmp_path / "eval.json"
    evaluation.main(["--model", str(tmp_path / "grpo_lora" / "latest"), "--tasks", task, "--data", eval_file,
                     "--media-root", media, "--max-new-tokens", "8", "--out", str(results), *COMMON])
    scored = json.load(open(results))[task]
    assert 0.0 <= scored["truncated"] <= 1.0 and "format_rate" in scored
