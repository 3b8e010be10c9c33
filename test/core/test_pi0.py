"""The π0 family on a tiny random transformers PI0: the joint loss is π0's own flow loss plus the rationale CE, the
masks say what the expert and the rationale see, cached greedy decoding matches teacher forcing, and train (both
orders, λ_r = 0) -> checkpoint -> Policy -> chunked execution -> closed loop in the simulator."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional

from refinevla_core.config import ConfigError
from refinevla_core.data.stats import ActionStats
from refinevla_core.inference.config import PolicyConfig
from refinevla_core.inference.policy import Policy
from refinevla_core.inference.policy_pi0 import Pi0Policy
from refinevla_core.model.checkpoint import CheckpointError, load_checkpoint
from refinevla_core.model.pi0.configuration_pi0 import RefineVLAPi0Config
from refinevla_core.model.pi0.modeling_pi0 import Pi0ModelError, RefineVLAPi0
from refinevla_core.model.presets import load_preset
from refinevla_core.training.config import CONFIG_DIR, load_train_config
from refinevla_core.training.trainer import Trainer
from test.core.training_support import make_dataset

STATS = ActionStats(q01=-np.ones(7), q99=np.ones(7), mean=np.full(7, 0.1), std=np.full(7, 0.5),
                    min=np.full(7, -2.0), max=np.full(7, 2.0), num_frames=10)


@pytest.fixture(scope="module")
def tiny() -> RefineVLAPi0:
    torch.set_num_threads(1)
    model = RefineVLAPi0.build(load_preset("pi0-tiny"))
    model.processor.set_action_stats(STATS)
    return model


def batch_for(model: RefineVLAPi0, rationales, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 255, (64, 80, 3), dtype=np.uint8) for _ in rationales]
    chunks = rng.normal(0.1, 0.5, (len(rationales), model.refinevla_config.chunk_size, 7))
    is_pad = np.zeros(chunks.shape[:2], dtype=bool)
    is_pad[0, -1] = True  # the last step of row 0 lies past its episode's end
    instructions = ["push the red cube", "pick up the block on the left"][: len(rationales)]
    return model.processor.training_batch(images, instructions, chunks, is_pad, rationales)


def with_order(model: RefineVLAPi0, order: str) -> RefineVLAPi0:
    config = RefineVLAPi0Config.from_dict({**model.refinevla_config.to_dict(), "target_order": order})
    return RefineVLAPi0(model.vlm, model.processor, config)


def fixed_noise(batch: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(batch["actions"].shape, generator=g),
            "timestep": torch.rand((batch["actions"].shape[0],), generator=g) * 0.9 + 0.05}


# ---- the loss ------------------------------------------------------------------------------------------------------
def test_flow_term_is_pi0s_own_forward_on_the_real_action_dimensions(tiny):
    batch = batch_for(tiny, [None, None])
    draw = fixed_noise(batch)
    with torch.no_grad():
        ours = tiny(**batch, lambda_rationale=0.0, **draw)
        theirs = tiny.vlm(state=batch["state"], input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                          pixel_attention_mask=batch["pixel_attention_mask"], attention_mask=batch["attention_mask"],
                          actions=batch["actions"], noise=draw["noise"], timestep=draw["timestep"])
    torch.testing.assert_close(ours.velocity, theirs.logits, rtol=1e-5, atol=1e-5)
    target = draw["noise"] - batch["actions"]
    valid = ~batch["action_is_pad"]
    expected = functional.mse_loss(theirs.logits[valid][:, :7], target[valid][:, :7])
    torch.testing.assert_close(ours.joint_loss.action, expected, rtol=1e-5, atol=1e-6)
    assert ours.joint_loss.action_tokens == int(valid.sum()) * 7 and ours.joint_loss.rationale_tokens == 0


def test_lambda_zero_gradients_are_plain_pi0_fine_tuning(tiny):
    """λ_r = 0: the same gradients as π0's own flow loss, even with rationale tokens in the batch (auxiliary order:
    the expert does not see them, and the CE adds nothing)."""
    aux = with_order(tiny, "action_then_rationale")
    with_rationale = batch_for(aux, ["the cube is left of the gripper", "move right"])
    plain = batch_for(aux, [None, None])
    draw = fixed_noise(plain)

    def grads(batch: dict) -> dict[str, torch.Tensor]:
        aux.vlm.zero_grad(set_to_none=True)
        out = aux(**batch, lambda_rationale=0.0, **draw)
        out.joint_loss.total.backward()
        return {n: p.grad.clone() for n, p in aux.vlm.named_parameters() if p.grad is not None}

    a, b = grads(with_rationale), grads(plain)
    assert a.keys() == b.keys() and len(a) > 20
    # the same maths on sequences of different length: equal up to float rounding, relative to the largest gradient
    # (some gradients are zero in exact arithmetic, e.g. of key biases under softmax, and only rounding noise here)
    scale = max(float(g.abs().max()) for g in b.values())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    aux.vlm.zero_grad(set_to_none=True)


def test_rationale_term_is_the_tied_embedding_cross_entropy_and_the_masks_hold(tiny):
    cot = with_order(tiny, "rationale_then_action")
    batch = batch_for(cot, ["the cube is left of the gripper", None])
    draw = fixed_noise(batch)
    with torch.no_grad():
        out = cot(**batch, lambda_rationale=0.5, **draw)
        hidden = cot.prefix_pass(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                  batch["pixel_attention_mask"], batch["token_type_ids"]).last_hidden_state
    mask = batch["rationale_mask"][:, 1:]
    logits = hidden[:, :-1][mask] @ cot.vlm.model.vlm.get_input_embeddings().weight.T
    expected = functional.cross_entropy(logits, batch["input_ids"][:, 1:][mask])
    torch.testing.assert_close(out.joint_loss.rationale, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.joint_loss.total, out.joint_loss.action + 0.5 * expected, rtol=1e-5, atol=1e-5)

    # rationale tokens are causal (a later token does not change earlier positions); the prefix is bidirectional
    positions = batch["rationale_mask"][0].nonzero()[:, 0]
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, positions[-2]] = 400
    with torch.no_grad():
        other = cot.prefix_pass(changed["input_ids"], changed["attention_mask"], changed["pixel_values"],
                                 changed["pixel_attention_mask"], changed["token_type_ids"]).last_hidden_state
    diff = (other - hidden).abs().amax(-1)[0]
    assert float(diff[: positions[-2]].max()) == 0.0 and float(diff[positions[-2]]) > 0

    # the expert sees the rationale in chain-of-thought order, not in the auxiliary order
    aux = with_order(tiny, "action_then_rationale")
    plain = batch_for(aux, [None, None])
    with torch.no_grad():
        v_cot = cot(**batch, **draw).velocity[0]
        v_aux = aux(**batch_for(aux, ["the cube is left of the gripper", None]), **draw).velocity[0]
        v_plain = aux(**plain, **draw).velocity[0]
    torch.testing.assert_close(v_aux, v_plain, rtol=1e-5, atol=1e-5)
    assert float((v_cot - v_plain).abs().max()) > 1e-4


def test_cached_greedy_rationale_matches_teacher_forcing_and_chunks_are_seeded(tiny):
    cot = with_order(tiny, "rationale_then_action")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    instructions = ["push the cube", "pick up the red block please"]  # different lengths: left padding
    gen = cot.generate(images, instructions, plan="rationale_then_action", max_rationale_tokens=6)
    for g, image, instruction in zip(gen, images, instructions, strict=True):
        assert g.chunk.shape == (4, 32) and 1 <= len(g.rationale_ids) <= 6
        assert g.rationale_ids[-1] == cot.processor.eos_id
        batch = cot.processor.training_batch([image], [instruction], np.zeros((1, 4, 7)), np.zeros((1, 4), bool),
                                             [None])
        ids = torch.cat([batch["input_ids"], torch.tensor([g.rationale_ids])], dim=1)
        types = torch.cat([batch["token_type_ids"], torch.ones((1, len(g.rationale_ids)), dtype=torch.long)], dim=1)
        with torch.no_grad():
            hidden = cot.prefix_pass(ids, torch.ones_like(ids), batch["pixel_values"],
                                      batch["pixel_attention_mask"], types).last_hidden_state
        logits = cot.rationale_logits(hidden[0, -len(g.rationale_ids) - 1 : -2])
        logits[:, [cot.processor.image_token_id, cot.processor.pad_id, cot.processor.bos_id]] = float("-inf")
        assert logits.argmax(-1).tolist() == g.rationale_ids[:-1]
    again = cot.generate(images[:1], instructions[:1], plan="action", seed=5)[0].chunk
    np.testing.assert_array_equal(again, cot.generate(images[:1], instructions[:1], plan="action", seed=5)[0].chunk)
    assert not np.array_equal(again, cot.generate(images[:1], instructions[:1], plan="action", seed=6)[0].chunk)


def test_actions_are_normalised_padded_and_decoded_into_the_data_range(tiny):
    proc = tiny.processor
    actions = np.array([[0.1, -0.4, 0.6, 0.1, 0.1, 0.1, 1.0]], dtype=np.float32)
    norm = proc.normalize_actions(actions)
    assert norm.shape == (1, 32) and float(norm[0, 7:].abs().max()) == 0.0
    np.testing.assert_allclose(proc.decode_actions(norm), actions, atol=1e-6)
    wild = torch.full((1, 32), 1e6)
    wild[0, 0] = float("nan")
    decoded = proc.decode_actions(wild)
    assert np.isfinite(decoded).all() and (decoded <= STATS.max).all() and (decoded >= STATS.min).all()


def test_long_rationales_keep_every_section_within_the_budget(tiny):
    from refinevla_core.rationale import Rationale

    proc = tiny.processor
    long = Rationale(*(f"section {i} " + "the cube is left of the gripper and far away " * 6 for i in range(4)))
    assert not proc.rationale_fits(long) and proc.rationale_fits(Rationale("a", "b", "c", "d"))
    ids = proc.rationale_ids(long)
    assert len(ids) == tiny.refinevla_config.max_rationale_tokens and ids[-1] == proc.eos_id
    assert len(proc.decode_text(ids).split("\n")) == 4, "every section survives, shortened"


def test_bad_configs_and_missing_bases_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="expert must have the text model's num_hidden_layers"):
        load_preset("pi0-tiny", {"base.expert.num_hidden_layers": 3})
    with pytest.raises(ConfigError, match=r"execute_steps must be in 0\.\.chunk_size"):
        load_preset("pi0-tiny", {"execute_steps": 9})
    config = load_preset("pi0-base")
    missing = RefineVLAPi0Config.from_dict({**config.to_dict(), "base": {
        **config.to_dict()["base"], "pretrained": str(tmp_path / "nowhere"), "tokenizer": str(tmp_path / "tok")}})
    with pytest.raises((Pi0ModelError, ValueError), match=r"licence|huggingface-cli download"):
        RefineVLAPi0.build(missing)


def test_a_local_pi0_folder_is_a_base_and_the_weights_use_lerobots_names(tiny, tmp_path, monkeypatch):
    """base_checkpoint=<folder> with PI0 weights (as transformers writes them: LeRobot's key names, which it renames
    at load, so lerobot/pi0_base loads the same way) and a tokenizer: the built model computes what was saved."""
    from safetensors import safe_open

    from refinevla_core.model.pi0.modeling_pi0 import build_pi0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "pi0_base"
    tiny.vlm.save_pretrained(str(folder))
    tiny.processor.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("paligemma_with_expert.paligemma.model.") for k in keys)
    assert any(k.startswith("paligemma_with_expert.gemma_expert.model.layers.") for k in keys)
    assert "state_proj.weight" in keys and "action_out_proj.weight" in keys
    base = build_pi0(load_preset("pi0-tiny"), base_checkpoint=str(folder))
    assert base.refinevla_config.base.source == "pretrained"
    base.processor.set_action_stats(STATS)
    batch = batch_for(base, [None, None])
    draw = fixed_noise(batch)
    with torch.no_grad():
        torch.testing.assert_close(base(**batch, **draw).velocity, tiny(**batch, **draw).velocity)


# ---- train -> checkpoint -> Policy -> closed loop ------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pi0data") / "ds"
    make_dataset(root, episodes=3, length=5)
    return root


def train_tiny(dataset: Path, out: Path, **overrides):
    config = load_train_config(CONFIG_DIR / "train_pi0_tiny.yaml", {
        "dataset": str(dataset), "output_dir": str(out), "max_steps": 3, "batch_size": 4, "lr": 3e-3,
        "warmup_steps": 0, "log_every": 1, "eval_every": 3, "save_every": 3, "progress_bar": False,
        "torch_threads": 1, "val_fraction": 0.34, **overrides})
    trainer = Trainer(config, log=lambda _m: None)
    return trainer, trainer.run()


@pytest.mark.parametrize("order", ["rationale_then_action", "action_then_rationale"])
def test_train_checkpoint_policy_in_both_orders(dataset, tmp_path, order):
    trainer, result = train_tiny(dataset, tmp_path / "run", target_order=order)
    vlm = trainer.refinevla.vlm
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.dit.layers.") for n in trainable) and "action_out_proj.weight" in trainable
    assert any(".language_model.layers.1." in n for n in trainable)
    assert not any("vision_tower" in n or ".language_model.layers.0." in n or "embed_tokens" in n for n in trainable)
    train = result.metrics["train"]
    assert len(train) == 3 and all(np.isfinite(r["loss_action"]) for r in train)
    assert any(np.isfinite(r["loss_rationale"]) for r in train)
    val = result.metrics["val"][-1]
    assert np.isfinite(val["action_l1"]) and "rationale_token_accuracy" in val

    loaded = load_checkpoint(result.final_checkpoint)
    assert loaded.family == "pi0" and loaded.refinevla_config.target_order == order
    policy = Policy.from_checkpoint(result.final_checkpoint, config=PolicyConfig(rationale_mode="every_n",
                                                                                   rationale_every_n=3))
    assert isinstance(policy, Pi0Policy) and policy.replan_every == 2
    rng = np.random.default_rng(0)
    outputs = [policy.predict(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "push the red cube")
               for _ in range(5)]
    # chunks at steps 0, 2 (2 actions executed) and 3 (a rationale is due every 3 steps: re-plan with it)
    assert policy.plans == 3 and [o.rationale_fresh for o in outputs] == [True, False, False, True, False]
    assert [o.timings_ms["chunk_index"] for o in outputs] == [0, 1, 0, 0, 1]
    assert all(o.action.shape == (7,) and np.isfinite(o.action).all() for o in outputs)
    # the rationale written at step 0 is carried (and, in chain-of-thought order, fed) until the next one at step 3
    assert outputs[1].rationale_text == outputs[2].rationale_text == outputs[0].rationale_text
    assert policy.rows[0].rationale_ids and policy.rows[0].rationale_ids[-1] == policy.model.processor.eos_id
    policy.reset()
    assert policy.step == 0 and policy.predict(np.zeros((64, 64, 3), np.uint8), "push").timings_ms["chunk_index"] == 0


def test_lambda_zero_run_logs_no_rationale_and_checkpoint_errors_are_clear(dataset, tmp_path):
    trainer, result = train_tiny(dataset, tmp_path / "run", lambda_rationale=0.0,
                                 target_order="action_then_rationale")
    vlm = trainer.refinevla.vlm
    frozen = {n for n, p in vlm.named_parameters() if not p.requires_grad}
    assert "model.vlm.language_model.norm.weight" in frozen, "nothing reads the VLM's output at λ_r = 0"
    assert all(np.isfinite(r["loss_action"]) for r in result.metrics["train"])
    with pytest.raises(CheckpointError, match="missing its action statistics"):
        checkpoint = result.final_checkpoint
        os.remove(checkpoint / "stats.json")
        load_checkpoint(checkpoint)


def test_policy_refuses_unsupported_modes_and_bad_replanning(tiny):
    with pytest.raises(ConfigError, match=r"not available for π0|is not one of"):
        Pi0Policy(tiny, PolicyConfig(rationale_mode="async"))
    with pytest.raises(ConfigError, match=r"replan_every must be in 1\.\.chunk_size"):
        Pi0Policy(tiny, PolicyConfig(), replan_every=9)
    with pytest.raises(ConfigError, match=r"replan_every must be in 1\.\.chunk_size"):
        Pi0Policy(tiny, PolicyConfig(execute_steps=5))
    assert Pi0Policy(tiny, PolicyConfig(execute_steps=3)).replan_every == 3
    assert Pi0Policy(tiny, PolicyConfig()).replan_every == tiny.refinevla_config.replan_every == 2


def test_lora_keeps_the_expert_training_and_saves_a_merged_checkpoint(dataset, tmp_path):
    trainer, result = train_tiny(dataset, tmp_path / "lora", **{"lora.enabled": True, "lora.save_adapter": False})
    trainable = {n for n, p in trainer.refinevla.vlm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and ".language_model.layers.1." in n for n in trainable)
    assert not any("lora_" in n and ".language_model.layers.0." in n for n in trainable)
    assert any(".dit.layers." in n and "lora_" not in n for n in trainable), "the expert trains fully under LoRA"
    merged = load_checkpoint(result.final_checkpoint)
    assert not hasattr(merged.vlm, "peft_config")
    with pytest.raises(ConfigError, match="gradient_checkpointing is not available for π0"):
        train_tiny(dataset, tmp_path / "gc", gradient_checkpointing=True)


def test_the_real_size_random_preset_is_pi0_bases_architecture():
    """pi0-base-random (refinevla bench gpu) has transformers' PI0Config defaults, i.e. lerobot/pi0_base's sizes."""
    from transformers import PI0Config

    from refinevla_core.model.pi0.modeling_pi0 import pi0_hf_config

    ours, reference = pi0_hf_config(load_preset("pi0-base-random"), 1100, 1050).to_dict(), PI0Config().to_dict()
    for key in ("chunk_size", "max_state_dim", "max_action_dim", "num_inference_steps"):
        assert ours[key] == reference[key], key
    assert ours["dit_config"] == reference["dit_config"]
    for sub in ("text_config", "vision_config"):
        mine, theirs = ours["vlm_config"][sub], reference["vlm_config"][sub]
        assert {k: v for k, v in mine.items() if k != "vocab_size"} == {
            k: v for k, v in theirs.items() if k != "vocab_size"}, sub
    assert ours["vlm_config"]["text_config"]["vocab_size"] == reference["vlm_config"]["text_config"]["vocab_size"]


def test_bf16_run_keeps_trainable_weights_fp32_and_its_checkpoint_acts(dataset, tmp_path):
    import yaml

    spec = yaml.safe_load((CONFIG_DIR / "model_pi0-tiny.yaml").read_text())
    spec["dtype"] = "bfloat16"
    (tmp_path / "pi0_bf16.yaml").write_text(yaml.safe_dump(spec))
    trainer, result = train_tiny(dataset, tmp_path / "bf16", preset=str(tmp_path / "pi0_bf16.yaml"),
                                 precision="bf16")
    dtypes = {p.dtype for p in trainer.refinevla.vlm.parameters() if p.requires_grad}
    frozen = {p.dtype for p in trainer.refinevla.vlm.parameters() if not p.requires_grad}
    assert dtypes == {torch.float32} and frozen == {torch.bfloat16}
    assert all(np.isfinite(r["loss"]) for r in result.metrics["train"])
    policy = Policy.from_checkpoint(result.final_checkpoint)
    assert policy.model.dtype == torch.bfloat16
    assert np.isfinite(policy.predict(np.zeros((64, 64, 3), np.uint8), "push the cube").action).all()
