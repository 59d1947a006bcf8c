"""Tests of model.py's hand-written LoRA and memory helpers (bf16, gradient checkpointing, reference).

All on the toy model in float32 (bf16 where named), with two real detection records of two
112 x 112 frames: a few seconds in all.
"""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import Qwen2_5_VLForConditionalGeneration

import data
import model
from tests.real_checkpoint import make_records


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def toy_setup(tmp_path_factory):
    """The toy model (geometry prior on), its tokenizer and config, and a training batch."""
    net, tokenizer, cfg = model.load_model("toy")
    records = make_records(tmp_path_factory.mktemp("records"))
    return net, tokenizer, cfg, data.collate(records, tokenizer, cfg), records


@pytest.fixture
def toy(toy_setup):
    """A fresh copy of the toy model per test (training mutates it), with the shared batch."""
    net, tokenizer, cfg, batch, records = toy_setup
    return copy.deepcopy(net), tokenizer, cfg, batch, records


def answer_loss(net, batch) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (position t - 1 predicts token t): a toy SFT loss."""
    logits = net(**batch)[:, :-1].float()
    mask = batch["loss_mask"][:, 1:].float()
    nll = F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="none")
    return (nll * mask.flatten()).sum() / mask.sum()


def train_steps(net, batch, params, steps=3) -> None:
    """A few AdamW steps with weight decay on `params` (weight decay would move any frozen tensor it saw)."""
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        answer_loss(net, batch).backward()
        optimizer.step()


def logits_of(net, batch) -> torch.Tensor:
    with torch.no_grad():
        return net(**batch)


MERGERS = ("geometry_merger.", "reference_merger.")


def base_tensors(net) -> dict:
    """Every tensor that is not an adapter or the geometry merger, cloned: what LoRA must leave alone."""
    return {k: v.clone() for k, v in net.state_dict().items()
            if not k.endswith(model.LORA_SUFFIXES) and not k.startswith(MERGERS)}


# ----------------------------------------------------------------------------- LoRA

def test_adapted_model_starts_exactly_at_the_base(toy):
    net, _, _, batch, _ = toy
    before = logits_of(net, batch)
    params = model.add_lora(net, rank=4, alpha=8, dropout=0.1)  # train mode: dropout is live
    assert torch.equal(logits_of(net, batch), before)  # B = 0: bit for bit the base model
    layer = net.lm.model.language_model.layers[0]
    assert isinstance(layer.self_attn.q_proj, model.LoRALinear)
    assert isinstance(layer.mlp.down_proj, model.LoRALinear)
    # the ViT's MLP has gate_proj / up_proj / down_proj too, and stays untouched
    assert not any(isinstance(m, model.LoRALinear) for m in net.lm.model.visual.modules())
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 7 * 2 + 5 and len(params) == len(names)  # 2 layers x 7 targets x (A, B) + merger
    assert all(n.endswith(model.LORA_SUFFIXES) or n.startswith("geometry_merger.") for n in names)


def test_a_step_moves_only_adapters_and_merger(toy):
    net, _, _, batch, _ = toy
    base = base_tensors(net)
    merger = {k: v.clone() for k, v in net.geometry_merger.state_dict().items()}
    params = model.add_lora(net, rank=4, alpha=8)
    train_steps(net, batch, params, steps=1)  # AdamW with weight decay: it moves whatever it is given
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # every base tensor bit-identical
    assert all(not torch.equal(after[f"geometry_merger.{k}"], v) for k, v in merger.items())
    assert all(after[k].abs().sum() > 0 for k in after if k.endswith(".lora_B"))  # B left zero
    # the merger's frozen starting copy (the KL reference's) did not move with it
    assert all(torch.equal(after[f"reference_merger.{k}"], v) for k, v in merger.items())


def test_adapters_disabled_is_the_base_model_after_training(toy):
    net, _, _, batch, _ = toy
    base = logits_of(net, batch)
    train_steps(net, batch, model.add_lora(net, rank=4, alpha=8))
    trained = logits_of(net, batch)
    assert not torch.allclose(trained, base, atol=1e-3)  # training did move the policy
    with model.adapters_disabled(net):
        reference = logits_of(net, batch)
    # the KL reference's log-probs: exactly those of the model before training, from the same weights
    assert torch.equal(torch.log_softmax(reference, -1), torch.log_softmax(base, -1))
    assert torch.equal(logits_of(net, batch), trained)  # switched back on leaving the block
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with model.adapters_disabled(model.load_model("toy")[0]):
            pass


def test_one_copy_of_the_base_weights(toy):
    net, _, _, batch, _ = toy
    before = {name: (p, p.data_ptr()) for name, p in net.named_parameters()}
    model.add_lora(net, rank=4, alpha=8)
    after = dict(net.named_parameters())
    # the same Parameter objects on the same memory: wrapped, not copied
    assert all(after[name] is p and p.data_ptr() == ptr for name, (p, ptr) in before.items())
    new = set(after) - set(before)
    assert all(n.endswith(model.LORA_SUFFIXES) or n.startswith("reference_merger.") for n in new)
    assert len({p.data_ptr() for p in net.parameters()}) == len(after)  # no two names share storage
    with model.adapters_disabled(net):  # the reference is computed from the very same tensors
        assert [p.data_ptr() for p in net.parameters()] == [p.data_ptr() for p in after.values()]
    # the base part in memory: exactly the base model's tensors, once
    base_names = [n for n in after if not n.endswith(model.LORA_SUFFIXES) and not n.startswith(MERGERS[1])]
    assert len(base_names) == len(before)


def test_merge_gives_the_same_outputs_and_the_plain_layout(toy):
    net, _, _, batch, _ = toy
    keys = set(net.state_dict())
    train_steps(net, batch, model.add_lora(net, rank=4, alpha=8))
    adapted = logits_of(net, batch)
    model.merge_lora(net)
    assert not model.has_lora(net) and set(net.state_dict()) == keys  # the plain checkpoint layout again
    assert isinstance(net.lm.model.language_model.layers[1].mlp.up_proj, torch.nn.Linear)
    torch.testing.assert_close(logits_of(net, batch), adapted, atol=1e-5, rtol=0)


def test_save_load_round_trip_with_adapters(tmp_path, toy):
    net, tokenizer, cfg, batch, _ = toy
    base = logits_of(net, batch)
    base_state = base_tensors(net)
    train_steps(net, batch, model.add_lora(net, rank=4, alpha=8, dropout=0.05))
    net.eval()  # no dropout: outputs are comparable
    model.save_model(net, tokenizer, cfg, str(tmp_path))
    assert json.loads((tmp_path / model.ADAPTER_CONFIG_FILE).read_text())["r"] == 4
    loaded, _, _ = model.load_model(str(tmp_path))
    loaded.eval()
    assert model.has_lora(loaded) and torch.equal(logits_of(loaded, batch), logits_of(net, batch))
    with model.adapters_disabled(loaded):  # the reference merger came back too
        assert torch.equal(logits_of(loaded, batch), base)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in net.named_parameters() if p.requires_grad]
    # model.safetensors is the untouched base model: plain transformers opens it as one
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path), local_files_only=True)
    assert all(torch.equal(v, base_state[f"lm.{k}"]) for k, v in plain.state_dict().items())
    # base + adapters, merged after loading = the merged original
    merged = logits_of(model.merge_lora(loaded), batch)
    torch.testing.assert_close(merged, logits_of(model.merge_lora(net), batch), atol=1e-6, rtol=0)
    # saving the merged model over the folder removes the adapter files: nothing stale comes back
    model.save_model(net, tokenizer, cfg, str(tmp_path))
    assert not (tmp_path / model.ADAPTER_FILE).exists()
    assert not model.has_lora(model.load_model(str(tmp_path))[0])


def test_lora_refuses_nonsense(toy):
    net = toy[0]
    with pytest.raises(ValueError, match="no linear layer named"):
        model.add_lora(copy.deepcopy(net), targets=("qkv",))  # a ViT name: not in the LLM
    model.add_lora(net)
    with pytest.raises(ValueError, match="already has LoRA"):
        model.add_lora(net)


# ----------------------------------------------------------------------------- memory

def grads_of(net, loss_fn) -> dict:
    """The gradient of every parameter that gets one, after one backward of loss_fn(net)."""
    net.zero_grad()
    loss_fn(net).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_the_gradients(toy):
    """SFT's plain pass and GRPO's prompt-once scoring (KV cache with gradients), with and without it."""
    net, tokenizer, cfg, batch, records = toy
    prompts = data.collate(records, tokenizer, cfg, with_answer=False)
    completions = torch.randint(0, 600, (4, 5), generator=torch.Generator().manual_seed(0))

    def grpo_loss(m):
        logits = m(**prompts, completion_ids=completions, copies=[3, 1])
        return torch.log_softmax(logits, -1).gather(-1, completions.unsqueeze(-1)).mean()

    for loss_fn in (lambda m: answer_loss(m, batch), grpo_loss):
        plain = grads_of(net, loss_fn)
        checkpointed = grads_of(model.enable_gradient_checkpointing(copy.deepcopy(net)), loss_fn)
        # every parameter gets a gradient (the toy trains all of them), bit for bit the same: the
        # rerun repeats the forward's operations exactly (on this CPU)
        assert plain.keys() == checkpointed.keys() and len(plain) == len(list(net.parameters()))
        assert all(torch.equal(checkpointed[name], plain[name]) for name in plain)


def test_gradient_checkpointing_reaches_frozen_input_adapters(toy):
    """LoRA freezes the embeddings, so the layers' input needs no gradient: adapters still get theirs."""
    net, _, _, batch, _ = toy
    model.add_lora(net, rank=4, alpha=8)
    with torch.no_grad():  # B != 0, so that A gets a gradient too
        for n, p in net.named_parameters():
            if n.endswith(".lora_B"):
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    plain = grads_of(net, lambda m: answer_loss(m, batch))
    checkpointed = grads_of(model.enable_gradient_checkpointing(net), lambda m: answer_loss(m, batch))
    adapters = [n for n in plain if n.endswith(model.LORA_SUFFIXES)]
    assert len(adapters) == 28 and all(plain[n].abs().sum() > 0 for n in adapters)
    assert plain.keys() == checkpointed.keys() and all(torch.equal(checkpointed[n], plain[n]) for n in plain)


def test_bf16_toy_loads_runs_and_saves_bf16(tmp_path, toy_setup):
    _, tokenizer, _, _, records = toy_setup
    net, _, cfg = model.load_model("toy", dtype=torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}  # geometry merger included
    batch = data.collate(records, tokenizer, cfg)
    logits = logits_of(net, batch)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    prompts = data.collate(records, tokenizer, cfg, with_answer=False)
    assert net.generate(prompts, max_new_tokens=3, do_sample=False).shape == (2, 3)
    model.save_model(net, tokenizer, cfg, str(tmp_path))
    for name in ("model.safetensors", model.GEOMETRY_FILE):  # the files hold bf16, not fp32 upcasts
        with safe_open(os.path.join(tmp_path, name), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    again, _, _ = model.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert torch.equal(logits_of(again, batch), logits)


def test_reference_is_frozen_low_precision_and_merged(tmp_path, toy):
    net, tokenizer, cfg, batch, _ = toy
    train_steps(net, batch, model.add_lora(net, rank=4, alpha=8))
    model.save_model(net, tokenizer, cfg, str(tmp_path))
    ref = model.load_reference(str(tmp_path), dtype=torch.bfloat16)
    assert not ref.training and not model.has_lora(ref)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters())
    # the reference is the saved policy (adapters folded in), up to bf16 rounding
    torch.testing.assert_close(logits_of(ref, batch).float(), logits_of(net.eval(), batch), atol=0.1, rtol=0.05)
