"""The VLA: tiny preset built offline on the real PaliGemma2 classes, the processor's token layout and loss masks,
the reference joint loss, and grammar-constrained generation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import PaliGemmaForConditionalGeneration

from refinevla_core.config import ConfigError
from refinevla_core.data import DataError
from refinevla_core.model.configuration_refinevla import RefineVLAConfig
from refinevla_core.model.modeling_refinevla import ActionGrammar, ModelError, RefineVLA, token_losses
from refinevla_core.model.presets import build_from_preset, build_processor, load_preset, paligemma_config
from refinevla_core.model.processor_refinevla import IGNORE_INDEX, ProcessorError, RefineVLAProcessor
from test.core.model_util import INSTRUCTION, RATIONALE, TARGET_ACTION, example_image, tiny_vla


def test_tiny_preset_is_a_paligemma2_built_offline():
    vla = tiny_vla()
    assert isinstance(vla.vlm, PaliGemmaForConditionalGeneration)
    assert vla.vlm.config.text_config.model_type == "gemma2"
    assert vla.vlm.config.vision_config.model_type == "siglip_vision_model"
    assert 1.5e6 < vla.num_parameters() < 2.0e6
    lay = vla.processor.layout
    assert lay.num_image_tokens == 64 == vla.processor.hf_processor.image_seq_length
    assert vla.vlm.config.image_token_id == lay.image_token_id
    tok = vla.processor.tokenizer
    last = f"<act_{lay.n_action_bins - 1:03d}>"
    assert tok.convert_ids_to_tokens([lay.action_token_start, lay.action_token_end - 1]) == ["<act_000>", last]
    assert vla.refinevla_config.tokens == lay
    assert vla.processor.config is vla.refinevla_config  # one config: edits reach the processor too
    other = RefineVLAConfig.from_dict({**vla.refinevla_config.to_dict(), "target_order": "action_then_rationale"})
    rewrapped = RefineVLA(vla.vlm, copy.copy(vla.processor), other)
    assert rewrapped.processor.config.target_order == "action_then_rationale"
    # the offline tokenizer falls back to bytes, so any text survives
    text = "place the spoon on the towel, 3 cm left — é ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def roles(batch, row):
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    return ids, labels, {k: batch[f"{k}_mask"][row] for k in ("action", "rationale", "format")}


def test_training_batch_rationale_then_action_layout():
    vla = tiny_vla("rationale_then_action")
    proc, lay = vla.processor, vla.processor.layout
    image = example_image()
    batch = proc.training_batch([image, image], [INSTRUCTION, "push the red cube to the target"],
                                np.stack([TARGET_ACTION] * 2), [RATIONALE, None])
    prefix = proc.prefix_ids(INSTRUCTION)
    assert prefix[:64] == [lay.image_token_id] * 64 and prefix[64] == lay.bos_id
    rat = proc.rationale_ids(RATIONALE)
    acts = proc.action_token_ids(proc.action_tokenizer.encode(TARGET_ACTION))
    p = len(prefix)
    ids, labels, m = roles(batch, 0)
    assert ids[: p + len(rat) + 9].tolist() == prefix + rat + [lay.begin_action_id, *acts, lay.eos_id]
    assert (batch["token_type_ids"][0, :p] == 0).all() and (batch["token_type_ids"][0, p : p + len(rat) + 9] == 1).all()
    assert m["rationale"].nonzero().flatten().tolist() == list(range(p, p + len(rat) + 1))  # text + <begin_action>
    assert m["action"].nonzero().flatten().tolist() == list(range(p + len(rat) + 1, p + len(rat) + 8))
    assert m["format"].nonzero().flatten().tolist() == [p + len(rat) + 8]  # <eos>
    # a sample without a rationale: <begin_action> is fed (label -100), the actions and <eos> are learned
    ids, labels, m = roles(batch, 1)
    p1 = len(proc.prefix_ids("push the red cube to the target"))
    assert ids[p1] == lay.begin_action_id and labels[p1] == IGNORE_INDEX
    assert m["action"].nonzero().flatten().tolist() == list(range(p1 + 1, p1 + 8)) and not m["rationale"].any()
    assert (batch["attention_mask"][1, p1 + 9 :] == 0).all()  # right padding
    assert batch["has_rationale"].tolist() == [True, False]
    for row in range(2):  # the masks are disjoint and cover exactly the supervised labels
        _, labels, m = roles(batch, row)
        total = m["action"].int() + m["rationale"].int() + m["format"].int()
        assert total.max() == 1 and ((labels != IGNORE_INDEX) == total.bool()).all()


def test_training_batch_action_then_rationale_layout():
    vla = tiny_vla("action_then_rationale")
    proc, lay = vla.processor, vla.processor.layout
    image = example_image()
    batch = proc.training_batch([image, image], [INSTRUCTION] * 2, np.stack([TARGET_ACTION] * 2), [RATIONALE, None])
    p, rat = len(proc.prefix_ids(INSTRUCTION)), proc.rationale_ids(RATIONALE)
    ids, labels, m = roles(batch, 0)
    assert ids[p] == lay.begin_action_id and labels[p] == IGNORE_INDEX
    assert m["action"].nonzero().flatten().tolist() == list(range(p + 1, p + 8))
    assert ids[p + 8] == lay.begin_rationale_id and labels[p + 8] == IGNORE_INDEX  # fed, never generated
    assert m["rationale"].nonzero().flatten().tolist() == list(range(p + 9, p + 9 + len(rat) + 1))  # text + <eos>
    assert ids[p + 9 + len(rat)] == lay.eos_id
    ids, labels, m = roles(batch, 1)
    assert m["format"].nonzero().flatten().tolist() == [p + 8] and ids[p + 8] == lay.eos_id


def test_rationales_are_truncated_to_max_rationale_tokens():
    proc = tiny_vla(max_rationale_tokens=24).processor
    long = RATIONALE.__class__(*(["the gripper is far to the left of the red cube near the plate"] * 4))
    assert 20 <= len(proc.rationale_ids(long)) <= 24 and not proc.rationale_fits(long)  # newlines cost a token each
    assert proc.rationale_ids(None) == [] and proc.rationale_ids("  ") == []


def test_token_losses_are_cross_entropy_over_each_group():
    vla = tiny_vla()
    image = example_image()
    batch = vla.processor.training_batch([image], [INSTRUCTION], TARGET_ACTION[None], [RATIONALE])
    with torch.no_grad():
        logits = vla(**batch).logits
    losses = token_losses(logits, batch)
    logp = torch.log_softmax(logits[0].float(), -1)
    for group in ("action", "rationale", "format"):
        positions = batch[f"{group}_mask"][0].nonzero().flatten()
        manual = -torch.stack([logp[t - 1, batch["labels"][0, t]] for t in positions]).mean()
        assert losses[group].item() == pytest.approx(manual.item(), rel=1e-5)
    # an untrained model is near uniform over the vocabulary
    assert losses["action"].item() == pytest.approx(np.log(logits.shape[-1]), rel=0.1)


def test_processor_errors_name_the_fix():
    vla = tiny_vla()
    proc = RefineVLAProcessor(vla.processor.hf_processor, vla.refinevla_config)  # no statistics
    image = example_image()
    with pytest.raises(DataError, match="set_action_stats"):
        proc.training_batch([image], [INSTRUCTION], TARGET_ACTION[None])
    with pytest.raises(DataError, match=r"shape \(1, 7\)"):
        vla.processor.training_batch([image], [INSTRUCTION], TARGET_ACTION[None, :6])
    with pytest.raises(ProcessorError, match="uint8"):
        vla.processor.generation_inputs([image.astype(np.float32)], [INSTRUCTION])
    with pytest.raises(ProcessorError, match=r"\(H, W, 3\)"):
        vla.processor.generation_inputs([image[..., 0]], [INSTRUCTION])
    with pytest.raises(ProcessorError, match="instruction is empty"):
        vla.processor.generation_inputs([image], [" "])
    with pytest.raises(ProcessorError, match="1 images but 2 instructions"):
        vla.processor.generation_inputs([image], [INSTRUCTION, INSTRUCTION])


@pytest.mark.parametrize("order", ["rationale_then_action", "action_then_rationale"])
def test_untrained_generation_still_follows_the_grammar(order):
    vla = tiny_vla(order)
    lay = vla.processor.layout
    for plan in ("action", order):
        (g,) = vla.generate([example_image(1)], [INSTRUCTION], plan=plan, max_rationale_tokens=6)
        assert g.action_bins.shape == (7,) and g.action_bins.min() >= 0 and g.action_bins.max() < 256
        if plan == "action":
            assert g.rationale_ids == [] and g.new_tokens == 7
        else:
            # random weights never end the rationale themselves: it is cut at the budget, and is plain text
            assert len(g.rationale_ids) <= 6
            assert not any(vla.processor.is_action_token(t) for t in g.rationale_ids)
            assert not {lay.begin_action_id, lay.begin_rationale_id, lay.image_token_id} & set(g.rationale_ids)
    with pytest.raises(ModelError, match="target order"):
        vla.generate([example_image()], [INSTRUCTION],
                     plan="action_then_rationale" if order == "rationale_then_action" else "rationale_then_action")


@pytest.mark.parametrize("order", ["rationale_then_action", "action_then_rationale"])
def test_a_rationale_may_end_only_once_it_has_all_four_sections(order):
    """A small model often stops mid-sentence; the grammar lets it end (<begin_action> / <eos>) only after four
    sections, and still lets it end then (the model decides when)."""
    vla = tiny_vla(order)
    lay, proc = vla.processor.layout, vla.processor
    vocab = vla.vlm.get_output_embeddings().weight.shape[0]
    end_id = lay.begin_action_id if order == "rationale_then_action" else lay.eos_id
    lead = [] if order == "rationale_then_action" else [*proc.action_token_ids(np.zeros(7)), lay.begin_rationale_id]
    grammar = ActionGrammar(proc, order, prompt_length=0, max_rationale_tokens=200, vocab_size=vocab)

    def may_end(text: str) -> bool:
        ids = lead + proc.tokenizer.encode(text, add_special_tokens=False)
        return bool(torch.isfinite(grammar(torch.tensor([ids]), torch.zeros(1, vocab))[0, end_id]))

    full = RATIONALE.text()
    assert may_end(full)
    assert not may_end(full[: full.index("Task Planning")])  # three sections
    assert not may_end(full[: full.index("Task Planning") + len("Task Planning:")])  # a heading with nothing after

    # end to end: a model that always wants to end writes on until its budget, which then forces the end
    eager = tiny_vla(order, fresh=True)
    with torch.no_grad():
        eager.vlm.get_output_embeddings().weight[end_id] *= 0
        eager.vlm.get_output_embeddings().weight[end_id, :] += 5.0  # a large logit for every hidden state
    (g,) = eager.generate([example_image(1)], [INSTRUCTION], plan=order, max_rationale_tokens=6)
    assert len(g.rationale_ids) == 6 and not g.rationale_complete


def test_batched_generation_matches_one_at_a_time():
    vla = tiny_vla()
    images = [example_image(1), example_image(2, (120, 90))]
    instructions = [INSTRUCTION, "put the spoon on the towel next to the plate"]  # different lengths: left padding
    inputs = [vla.processor.generation_inputs([im], [ins]) for im, ins in zip(images, instructions, strict=True)]
    with torch.no_grad():
        alone = [vla(**x).logits[0, -1] for x in inputs]
        both = vla(**vla.processor.generation_inputs(images, instructions)).logits[:, -1]
    for row in range(2):
        torch.testing.assert_close(both[row], alone[row], atol=1e-4, rtol=1e-4)
    one = [vla.generate([im], [ins], plan="rationale_then_action")[0] for im, ins in zip(images, instructions,
                                                                                          strict=True)]
    two = vla.generate(images, instructions, plan="rationale_then_action")
    for a, b in zip(one, two, strict=True):
        assert a.action_bins.tolist() == b.action_bins.tolist() and a.rationale_ids == b.rationale_ids


def test_pretrained_base_gets_the_refinevla_tokens(tmp_path):
    """The `pretrained` path on a local PaliGemma folder (a tiny random one saved by plain transformers: the real
    3B download is not available offline): tokens are added, the embedding grows, generation works."""
    config = load_preset("tiny")
    hf_processor = build_processor(config)
    base = PaliGemmaForConditionalGeneration(
        paligemma_config(config, len(hf_processor.tokenizer), hf_processor.tokenizer.convert_tokens_to_ids("<image>")))
    base.save_pretrained(tmp_path / "base")
    hf_processor.save_pretrained(tmp_path / "base")
    rows_before = base.get_input_embeddings().num_embeddings
    # 256 bins: more new tokens than the padded embedding has spare rows, so it must grow
    vla = build_from_preset("tiny", base_checkpoint=str(tmp_path / "base"), overrides={"n_action_bins": 256})
    assert vla.refinevla_config.base.source == "pretrained"
    assert vla.vlm.get_input_embeddings().num_embeddings >= vla.processor.layout.vocab_len > rows_before
    vla.processor.set_action_stats(tiny_vla().stats)
    assert vla.generate([example_image()], [INSTRUCTION])[0].action_bins.shape == (7,)


def test_preset_errors_name_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model preset 'huge'.*tiny"):
        load_preset("huge")
    with pytest.raises(ConfigError, match=r"cannot load the base model.*local folder"):
        build_from_preset("tiny", base_checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="target_order"):
        RefineVLAConfig(target_order="sideways")


def test_real_size_preset_matches_paligemma2_3b():
    """paligemma2-3b-224-random has PaliGemma2-3B-224's shapes (3.03B parameters); built on the meta device."""
    config = load_preset("paligemma2-3b-224-random")
    hf_config = paligemma_config(config, vocab_len=4096, image_token_id=4000)
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(hf_config)
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(3.032e9, rel=0.005)
    assert hf_config.text_config.num_hidden_layers == 26 and hf_config.vision_config.num_hidden_layers == 27
    assert load_preset("paligemma2-3b-224").base.pretrained == "google/paligemma2-3b-pt-224"
    assert isinstance(tiny_vla(), RefineVLA)


@pytest.mark.slow
def test_mid_preset_builds_trains_and_round_trips(tmp_path):
    """The ~40M-parameter CPU preset: 224 px (16x16 patches), a few joint-loss steps lower the loss, and the
    checkpoint round trip keeps its predictions (a minute of CPU: slow)."""
    from refinevla_core.model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    vla = build_from_preset("mid")
    assert 35e6 < vla.num_parameters() < 50e6 and vla.processor.layout.num_image_tokens == 256
    vla.processor.set_action_stats(tiny_vla().stats)
    image = example_image(0, (224, 224))
    batch = vla.processor.training_batch([image] * 2, [INSTRUCTION] * 2, np.stack([TARGET_ACTION] * 2),
                                         [RATIONALE, None])
    optimizer = torch.optim.AdamW(vla.parameters(), lr=1e-3)
    vla.train()
    first = None
    for _ in range(5):
        losses = token_losses(vla(**batch).logits, batch)
        loss = losses["action"] + 0.3 * losses["rationale"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vla.eval()
    assert loss.item() < first
    vla.save_pretrained(tmp_path / "mid")
    back = load_checkpoint(tmp_path / "mid")
    a, b = (m.generate([image], [INSTRUCTION], plan="rationale_then_action", max_rationale_tokens=8)[0]
            for m in (vla, back))
    assert a.action_bins.tolist() == b.action_bins.tolist() and a.rationale_ids == b.rationale_ids


def test_a_long_rationale_is_shortened_per_section_never_dropping_one():
    from dataclasses import replace

    from refinevla_core.model.presets import build_processor, load_preset
    from refinevla_core.model.processor_refinevla import RefineVLAProcessor
    from refinevla_core.rationale import Rationale, parse_rationale

    config = replace(load_preset("tiny"), max_rationale_tokens=40)
    processor = RefineVLAProcessor(build_processor(config), config)
    long = Rationale("the gripper is open above the table. " * 6, "phase: approach, reach the cube. " * 5,
                     "cube 8 cm forward of the gripper. " * 8, "steps: approach, push, done. " * 4)
    ids = processor.rationale_ids(long)
    assert len(ids) <= 40 and not processor.rationale_fits(long)
    text = processor.decode_text(ids)
    assert all(h in text for h in ("Observation:", "Situation Analysis:", "Spatial Reasoning:", "Task Planning:"))
    parse_rationale(text)  # still four sections
    short = Rationale("gripper open.", "phase: push.", "cube 8 cm forward of the gripper.", "steps: push, done.")
    assert processor.rationale_fits(short) and processor.decode_text(processor.rationale_ids(short)) == short.text()
