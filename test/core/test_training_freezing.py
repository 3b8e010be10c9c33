"""Selective transfer on a real (tiny) transformers PaliGemma: which parameters train, the new-token rows, LoRA, and
saving a plain model that computes what was trained."""

from __future__ import annotations

import warnings

import pytest
import torch

from refinevla_core.config import ConfigError
from refinevla_core.training.config import FreezeConfig
from refinevla_core.training.freezing import (
    TrainableRowsHead,
    apply_lora,
    apply_selective_transfer,
    export_for_saving,
    find_parts,
    resolve_frozen_layers,
)
from refinevla_core.training.loss import joint_loss
from test.core.training_support import NEW_TOKENS, model_inputs, snapshot, tiny_batch, tiny_paligemma

LAYERS = [f"model.language_model.layers.{i}" for i in range(8)]


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    model.train()
    for step in range(steps):
        batch = tiny_batch(seed=step)
        out = model(**model_inputs(batch))
        loss = joint_loss(out.logits, batch["labels"], batch["action_mask"], batch["rationale_mask"], 0.3)
        opt.zero_grad()
        loss.total.backward()
        opt.step()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(3, [0, 1, 2]), (0, []), (8, list(range(8))), (0.75, list(range(6))), ("50%", [0, 1, 2, 3]),
     (1.0, list(range(8))), (r"layers\.[0-2]$", [0, 1, 2]), (r"\.(1|5)$", [1, 5])],
)
def test_k_as_count_fraction_or_regex(spec, expected):
    assert resolve_frozen_layers(spec, LAYERS) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [(9, "only 8 layers"), (r"vision\.layers", "matches none of the 8 language layers")],
)
def test_bad_k_is_a_clear_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_frozen_layers(spec, LAYERS)


@pytest.mark.parametrize("spec", [1.5, -1, "[", True, "150%", [1, 2]])
def test_bad_k_is_rejected_by_the_config(spec):
    with pytest.raises(ConfigError, match="language_layers"):
        FreezeConfig(language_layers=spec)


def test_k_beyond_the_model_fails_before_anything_changes():
    model = tiny_paligemma(num_layers=4)
    with pytest.raises(ConfigError, match="only 4 layers"):
        apply_selective_transfer(model, FreezeConfig(language_layers=5), NEW_TOKENS)
    assert all(p.requires_grad for p in model.parameters())


def test_finds_the_parts_of_a_paligemma():
    parts = find_parts(tiny_paligemma(num_layers=3))
    assert parts.vision == "model.vision_tower"
    assert parts.projector == "model.multi_modal_projector"
    assert parts.language_model == "model.language_model"
    assert parts.layers == [f"model.language_model.layers.{i}" for i in range(3)]
    assert parts.embeddings == "model.language_model.embed_tokens"
    assert parts.head == "lm_head"


def test_selective_transfer_freezes_vision_projector_embeddings_and_lower_layers():
    model = tiny_paligemma(num_layers=4)
    report = apply_selective_transfer(model, FreezeConfig(language_layers=2), NEW_TOKENS)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(v for n, v in grads.items() if n.startswith("model.vision_tower."))
    assert not any(v for n, v in grads.items() if n.startswith("model.multi_modal_projector."))
    assert not grads["model.language_model.embed_tokens.weight"]
    for i in range(4):
        layer = [v for n, v in grads.items() if f"language_model.layers.{i}." in n]
        assert layer and all(v == (i >= 2) for v in layer), i
    assert grads["model.language_model.norm.weight"]
    assert grads["lm_head.rows"]
    assert report.frozen_layers == [0, 1] and report.num_layers == 4
    table = report.table()
    for group in ("vision tower", "projector", "embeddings", "language layers 0-1", "language layers 2-3",
                  "new-token rows", "trainable"):
        assert group in table
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable + report.frozen == sum(p.numel() for p in model.parameters())


def test_vision_and_projector_can_stay_trainable():
    model = tiny_paligemma()
    apply_selective_transfer(model, FreezeConfig(vision=False, projector=False, language_layers=0), NEW_TOKENS)
    assert all(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n)


def test_frozen_parameters_stay_bit_identical_and_every_trainable_one_changes():
    model = tiny_paligemma()
    apply_selective_transfer(model, FreezeConfig(language_layers=2), NEW_TOKENS)
    before = snapshot(model)
    train_steps(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_new_token_rows_learn_without_a_backward_pass_through_the_frozen_layers():
    model = tiny_paligemma()
    apply_selective_transfer(model, FreezeConfig(language_layers=2, new_token_rows="head"), NEW_TOKENS)
    head = model.lm_head
    assert isinstance(head, TrainableRowsHead)
    assert head.base.weight is model.model.language_model.embed_tokens.weight  # the frozen matrix stays tied
    merged_before = head.merged_weight()

    needs_grad = {}
    hooks = [
        model.model.language_model.layers[i].register_forward_hook(
            lambda _m, _i, out, i=i: needs_grad.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
        for i in range(4)
    ]
    train_steps(model)
    for h in hooks:
        h.remove()
    assert needs_grad == {0: False, 1: False, 2: True, 3: True}, "a frozen layer's output is in the backward graph"
    merged_after = head.merged_weight()
    changed = (merged_after != merged_before).any(dim=1)
    assert changed[NEW_TOKENS].all(), "every new-token head row must learn"
    assert not changed[[i for i in range(len(changed)) if i not in NEW_TOKENS]].any(), "other rows must not move"


def test_tied_rows_mode_learns_the_input_rows_too_and_pays_the_full_backward():
    model = tiny_paligemma()
    apply_selective_transfer(model, FreezeConfig(language_layers=2, new_token_rows="tied"), NEW_TOKENS)
    assert model.lm_head.rows is model.model.language_model.embed_tokens.rows
    needs_grad = {}
    hook = model.model.language_model.layers[0].register_forward_hook(
        lambda _m, _i, out: needs_grad.__setitem__(0, (out[0] if isinstance(out, tuple) else out).requires_grad)
    )
    embed_before = model.model.language_model.embed_tokens.base.weight.detach().clone()
    train_steps(model, steps=1)
    hook.remove()
    assert needs_grad[0], "tied rows feed layer 0, so its output needs a gradient"
    assert torch.equal(model.model.language_model.embed_tokens.base.weight, embed_before)


def test_rows_mode_none_leaves_the_rows_frozen():
    model = tiny_paligemma()
    report = apply_selective_transfer(model, FreezeConfig(language_layers=2, new_token_rows="none"), NEW_TOKENS)
    assert not isinstance(model.lm_head, TrainableRowsHead)
    assert report.new_token_rows == "none"
    assert not model.lm_head.weight.requires_grad


@pytest.mark.parametrize("mode", ["head", "tied"])
def test_saved_model_is_plain_transformers_and_computes_what_was_trained(tmp_path, mode):
    from transformers import AutoModelForImageTextToText

    model = tiny_paligemma()
    apply_selective_transfer(model, FreezeConfig(language_layers=2, new_token_rows=mode), NEW_TOKENS)
    train_steps(model, steps=2)
    model.eval()
    batch = tiny_batch(seed=7)
    with torch.no_grad():
        expected = model(**model_inputs(batch)).logits
    state_before = snapshot(model)
    with export_for_saving(model) as plain:
        plain.save_pretrained(tmp_path)
    # the training model is restored exactly: same wrappers, same values, tie flags back
    assert isinstance(model.lm_head, TrainableRowsHead)
    assert all(torch.equal(p, state_before[n]) for n, p in model.named_parameters())
    assert model.config.tie_word_embeddings is True
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.config.tie_word_embeddings is (mode == "tied")
    with torch.no_grad():
        got = loaded(**model_inputs(batch)).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_targets_only_the_trainable_language_layers_and_saves_merged(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = tiny_paligemma(num_layers=4)
    report = apply_selective_transfer(model, FreezeConfig(language_layers=2), NEW_TOKENS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal LoRA run shows no library deprecation warning
        peft_model = apply_lora(model, report, r=4, alpha=8, dropout=0.0, module_names=["q_proj", "v_proj", "fc1"])
    lora_modules = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora_modules and all("language_model.layers.2." in n or "language_model.layers.3." in n
                                for n in lora_modules), lora_modules
    assert not any("vision" in n for n in lora_modules)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lm_head.rows") for n in trainable), "the new-token rows keep training under LoRA"
    assert all("lora_" in n or n.endswith(".rows") for n in trainable)
    before = snapshot(peft_model)
    train_steps(peft_model)
    for name, p in peft_model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, f"{name}: frozen must stay, trainable must move"
    peft_model.eval()
    batch = tiny_batch(seed=3)
    with torch.no_grad():
        expected = peft_model(**model_inputs(batch)).logits
    with export_for_saving(peft_model) as plain:
        assert not hasattr(plain, "peft_config")
        plain.save_pretrained(tmp_path)
    assert hasattr(peft_model, "peft_config"), "the training model keeps its adapters"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = loaded(**model_inputs(batch)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_lora_with_every_layer_frozen_is_a_clear_error():
    model = tiny_paligemma(num_layers=2)
    report = apply_selective_transfer(model, FreezeConfig(language_layers=2), NEW_TOKENS)
    with pytest.raises(ConfigError, match="every language layer is frozen"):
        apply_lora(model, report, r=4, alpha=8, dropout=0.0, module_names=["q_proj"])
