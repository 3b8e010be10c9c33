"""The trainer end to end on the tiny preset and small datasets written with EpisodeDataset: what trains and what
stays frozen, both loss terms falling, λ_r = 0, validation, LoRA, resume after kill -9, and clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from refinevla_core.config import ConfigError
from refinevla_core.data.episode import DataError, Episode
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.data.stats import compute_dataset_stats
from refinevla_core.rationale import Rationale
from refinevla_core.training.config import CONFIG_DIR, TrainConfig, load_train_config
from refinevla_core.training.freezing import apply_selective_transfer
from refinevla_core.training.trainer import Trainer, build_model, list_checkpoints, new_token_ids, train
from test.core.training_support import make_dataset

ROOT = Path(__file__).resolve().parents[2]
SELECTIVE = {"freeze.vision": True, "freeze.projector": True, "freeze.embeddings": True, "freeze.language_layers": 2}


def config_for(dataset: Path, output_dir: Path, **overrides) -> TrainConfig:
    base = {
        "dataset": str(dataset), "output_dir": str(output_dir), "max_steps": 4, "batch_size": 4, "lr": 3e-3,
        "warmup_steps": 0, "log_every": 1, "eval_every": 1000, "save_every": 1000, "progress_bar": False,
        "torch_threads": 1, "val_fraction": 0.0,
    }
    return load_train_config(CONFIG_DIR / "train_tiny.yaml", {**base, **overrides})


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "ds"
    make_dataset(root, episodes=2, length=4)
    return root


def test_frozen_parameters_stay_bit_identical_and_every_trainable_one_changes(small_dataset, tmp_path):
    from refinevla_core.model.checkpoint import load_checkpoint

    cfg = config_for(small_dataset, tmp_path / "run", max_steps=3, **SELECTIVE)
    initial = build_model(cfg)
    apply_selective_transfer(initial.vlm, cfg.freeze, new_token_ids(initial))
    before = {n: p.detach().clone() for n, p in initial.vlm.named_parameters()}
    messages: list[str] = []
    trainer = Trainer(cfg, log=messages.append)
    result = trainer.run()

    trained = trainer.accelerator.unwrap_model(trainer.model).vlm
    frozen, trainable = [], []
    for name, p in trained.named_parameters():
        (trainable if p.requires_grad else frozen).append(name)
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    assert any("vision_tower" in n for n in frozen) and any("layers.1." in n for n in frozen)
    assert any("layers.3." in n for n in trainable) and "lm_head.rows" in trainable
    assert any("parameter group" in m and "new-token rows" in m for m in messages), "the table is printed at start"

    # the saved checkpoint: frozen weights bit-identical, new-token head rows trained, all other head rows untouched
    saved = load_checkpoint(result.final_checkpoint).vlm
    state = dict(saved.named_parameters())
    for name in frozen:
        if name.startswith("lm_head"):
            continue
        assert torch.equal(state[name], before[name]), name
    ids = new_token_ids(initial)
    embed = before["model.language_model.embed_tokens.weight"]
    others = torch.ones(embed.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(saved.lm_head.weight[others], embed[others])
    assert (saved.lm_head.weight[ids] != embed[ids]).any(dim=1).all()


@pytest.mark.parametrize("order", ["rationale_then_action", "action_then_rationale"])
def test_both_loss_terms_fall_when_overfitting_a_tiny_set(small_dataset, tmp_path, order):
    cfg = config_for(small_dataset, tmp_path / "run", max_steps=30, log_every=5, target_order=order,
                     rationale_dropout=0.25)
    history = train(cfg, log=quiet).metrics["train"]
    first, last = history[0], history[-1]
    assert last["loss_action"] < 0.7 * first["loss_action"], history
    assert last["loss_rationale"] < 0.8 * first["loss_rationale"], history
    assert all(np.isfinite(r["loss"]) for r in history)


@pytest.mark.parametrize("order", ["action_then_rationale", "rationale_then_action"])
def test_lambda_zero_is_plain_action_fine_tuning(small_dataset, tmp_path, order):
    """λ_r = 0 trains on actions alone in both orders: no rationale is fed as input either (with rationale-first
    order and dropout < 1 a fed rationale would be context the deployed action-only policy never has)."""
    cfg = config_for(small_dataset, tmp_path / "run", max_steps=30, log_every=5, lambda_rationale=0.0,
                     target_order=order, rationale_dropout=0.0)
    metrics = train(cfg, log=quiet).metrics
    history = metrics["train"]
    assert all(r["loss"] == pytest.approx(r["loss_action"]) for r in history), "L = L_action when λ_r = 0"
    assert history[-1]["loss_action"] < 0.7 * history[0]["loss_action"]
    assert all(r["loss_rationale"] is None or np.isnan(r["loss_rationale"]) for r in history), \
        "no rationale token was in any training sequence"
    assert metrics["data"]["rationale_dropout"] == 1.0 and metrics["data"]["rationales_shortened_share"] is None


def constant_action_dataset(root: Path) -> np.ndarray:
    """Different images, one action: a model that learnt it must decode it within half a bin. (Each constant dimension
    gets a tiny range around its value, so all seven land in the middle bin, 128; a random-init model predicts other
    bins.)"""
    action = np.array([0.01, -0.02, 0.03, 0.0, 0.05, -0.1, 0.501], np.float32)
    rng = np.random.default_rng(0)
    ds = EpisodeDataset.create(root)
    for _ in range(3):
        rats = [Rationale("a cube", "start", "cube ahead", "push forward")] * 4
        ds.append(Episode(images=rng.integers(0, 255, (4, 56, 72, 3), dtype=np.uint8),
                          actions=np.tile(action, (4, 1)), instruction="push the cube", rationales=rats))
    compute_dataset_stats(ds)
    return action


def cfg_bins(cfg: TrainConfig) -> int:
    from refinevla_core.model.presets import load_preset

    return load_preset(cfg.preset).n_action_bins


def test_validation_metrics_checkpoint_and_policy_on_a_learnable_set(tmp_path):
    from refinevla_core.inference.policy import Policy, PolicyConfig

    action = constant_action_dataset(tmp_path / "ds")
    cfg = config_for(tmp_path / "ds", tmp_path / "run", max_steps=20, val_fraction=0.34, eval_every=10,
                     log_every=5, rationale_dropout=0.0)
    result = train(cfg, log=quiet)
    val = result.metrics["val"]
    assert [v["step"] for v in val] == [10, 20]
    final = val[-1]
    assert final["frames"] == 4, "one held-out episode of 4 frames"
    assert final["action_token_accuracy_teacher_forced"] == 1.0
    half_bin = 0.5 / cfg_bins(cfg)  # the gripper's fixed [0, 1] range has the widest bins here
    assert final["action_l1"] <= half_bin and final["action_l1_teacher_forced"] <= half_bin
    assert len(final["action_l1_per_dim"]) == 7
    assert 0.0 <= final["rationale_token_accuracy"] <= 1.0 and final["val_loss_rationale"] > 0

    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert metrics["finished"] and metrics["step"] == 20
    assert metrics["val"][-1]["action_token_accuracy_teacher_forced"] == 1.0
    assert (result.output_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (result.final_checkpoint / "train_config.json").is_file()

    policy = Policy.from_checkpoint(result.final_checkpoint, config=PolicyConfig(rationale_mode="action_only"))
    out = policy.predict(np.zeros((56, 72, 3), np.uint8), "push the cube")
    np.testing.assert_allclose(out.action, action, atol=half_bin)


def test_lora_trains_and_saves_a_loadable_merged_checkpoint(small_dataset, tmp_path):
    from refinevla_core.model.checkpoint import load_checkpoint
    from test.core.training_support import model_inputs

    cfg = config_for(small_dataset, tmp_path / "run", max_steps=3, **SELECTIVE, **{"lora.enabled": True, "lora.r": 4})
    trainer = Trainer(cfg, log=quiet)
    result = trainer.run()
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = {n: p for n, p in model.vlm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.endswith(".rows") for n in trainable)
    assert all(float(p.detach().abs().sum()) > 0 for n, p in trainable.items() if "lora_B" in n), "B starts at 0"
    assert not any("vision" in n for n in trainable)

    loaded = load_checkpoint(result.final_checkpoint)
    assert not hasattr(loaded.vlm, "peft_config"), "the saved model is merged: plain transformers"
    samples = [trainer.val_frames[i] if len(trainer.val_frames) else trainer.train_frames[i] for i in range(2)]
    batch = trainer.collate(samples)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        got = loaded(**model_inputs(batch)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    adapter = result.final_checkpoint / "lora_adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "new_token_rows.safetensors").is_file()


def test_precision_accumulation_checkpointing_and_loader_options(small_dataset, tmp_path):
    plain = train(config_for(small_dataset, tmp_path / "a", max_steps=2, **SELECTIVE), log=quiet).metrics["train"]
    trainer = Trainer(config_for(small_dataset, tmp_path / "b", max_steps=2, gradient_checkpointing=True, **SELECTIVE),
                      log=quiet)
    checkpointed = trainer.run().metrics["train"]
    assert trainer.refinevla.vlm.is_activation_checkpointing
    for a, b in zip(plain, checkpointed, strict=True):  # recomputation changes memory, not results
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    workers = train(config_for(small_dataset, tmp_path / "w", max_steps=2, num_workers=2, **SELECTIVE),
                    log=quiet).metrics["train"]
    assert [r["loss"] for r in workers] == [r["loss"] for r in plain], "loader processes change speed, not data"
    bf16 = train(config_for(small_dataset, tmp_path / "c", max_steps=2, precision="bf16", grad_accumulation=2,
                            schedule="linear", warmup_steps=1), log=quiet).metrics["train"]
    assert len(bf16) == 2 and all(np.isfinite(r["loss"]) for r in bf16)
    assert bf16[0]["loss"] == pytest.approx(plain[0]["loss"], rel=0.05)
    assert bf16[0]["lr"] < bf16[1]["lr"] or bf16[1]["lr"] < 3e-3  # warm-up then linear decay


# ---- errors ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"preset": "huge"}, ConfigError, r"unknown model preset 'huge'; choose one of \[.*'tiny'"),
        ({"freeze.language_layers": 5}, ConfigError, "only 4 layers"),
        ({"freeze.language_layers": r"vision"}, ConfigError, "matches none of the 4 language layers"),
        ({"batch_size": 64}, DataError, "fewer than batch_size=64"),
    ],
)
def test_bad_configs_fail_before_anything_is_written(small_dataset, tmp_path, overrides, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train(config_for(small_dataset, out, **overrides), log=quiet)
    assert not out.exists()


def test_missing_dataset_or_statistics_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not a refinevla dataset"):
        train(config_for(tmp_path / "nowhere", tmp_path / "run"), log=quiet)
    make_dataset(tmp_path / "nostats", episodes=2, length=4, stats=False)
    with pytest.raises(DataError, match=r"no stats\.json; compute it once with .*compute_dataset_stats"):
        train(config_for(tmp_path / "nostats", tmp_path / "run"), log=quiet)
    assert not (tmp_path / "run").exists()


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    make_dataset(tmp_path / "nostats", episodes=2, length=4, stats=False)
    command = [sys.executable, "-m", "refinevla_core", "train", "--config", str(CONFIG_DIR / "train_tiny.yaml"),
               f"dataset={tmp_path / 'nostats'}", f"output_dir={tmp_path / 'run'}"]
    r = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("refinevla train: ") and "compute_dataset_stats" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_resume_refuses_a_changed_config_and_cleans_partial_saves(small_dataset, tmp_path):
    out = tmp_path / "run"
    train(config_for(small_dataset, out, max_steps=2, save_every=1), log=quiet)
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    with pytest.raises(ConfigError, match=r"lambda_rationale: 0.3 -> 0.5"):
        train(config_for(small_dataset, out, max_steps=4, lambda_rationale=0.5), log=quiet)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(config_for(small_dataset, out, max_steps=4, resume="never"), log=quiet)
    partial = out / "checkpoints" / ".tmp-step-00000003"
    (partial / "trainer_state").mkdir(parents=True)  # what a save killed half-way leaves behind
    result = train(config_for(small_dataset, out, max_steps=3, save_every=1), log=quiet)
    assert result.resumed_from == out / "checkpoints" / "step-00000002"
    assert not partial.exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002", "step-00000003"]  # keep_checkpoints: 2


def test_a_checkpoint_save_warns_about_nothing_and_resumes_the_same_weights(small_dataset, tmp_path, caplog, capfd):
    """accelerate's own safetensors save logs "Removed shared tensor ... check by verifying" for the tied lm_head at
    every checkpoint; the trainer saves tied weights once (safetensors save_model) and they come back tied."""
    import logging

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        trainer = Trainer(config_for(small_dataset, out, max_steps=2, save_every=1), log=quiet)
        trainer.run()
    printed = caplog.text + "".join(capfd.readouterr())
    assert "shared tensor" not in printed and "check by verifying" not in printed
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    saved = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}

    resumed = Trainer(config_for(small_dataset, out, max_steps=3, save_every=1), log=quiet)
    resumed.setup()  # builds a fresh model and loads the newest trainer state into it
    assert resumed.resume_from == out / "checkpoints" / "step-00000002"
    model = resumed.accelerator.unwrap_model(resumed.model)
    loaded = dict(model.named_parameters())
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name  # a file round trip: exact
    vlm = model.vlm
    assert vlm.lm_head.weight.data_ptr() == vlm.get_input_embeddings().weight.data_ptr(), "still tied"
    assert "shared tensor" not in caplog.text + "".join(capfd.readouterr())


# ---- resume after kill -9 --------------------------------------------------------------------------------------------
def _command(dataset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "refinevla_core", "train", "--config", str(CONFIG_DIR / "train_tiny.yaml"),
            f"dataset={dataset}", f"output_dir={out}", "max_steps=10", "batch_size=3", "grad_accumulation=2",
            "lr=3e-3", "warmup_steps=2", "save_every=2", "eval_every=5", "log_every=1", "val_fraction=0.34",
            "rationale_dropout=0.5", "torch_threads=1", "progress_bar=false"]


def test_resume_after_kill_9_equals_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    dataset = tmp_path / "ds"
    make_dataset(dataset, episodes=3, length=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the uninterrupted run, in this process: the same code path as the command (load_train_config + train)
    from refinevla_core.config import parse_overrides

    train(load_train_config(CONFIG_DIR / "train_tiny.yaml", parse_overrides(_command(dataset, tmp_path / "a")[6:])),
          log=quiet)

    out = tmp_path / "b"
    proc = subprocess.Popen(_command(dataset, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-00000004").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "final").exists(), "the run must be killed before it ends for this test to mean anything"
    killed_at = [p.name for p in list_checkpoints(out)]

    resumed = subprocess.run(_command(dataset, out), capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / killed_at[-1]}" in resumed.stderr

    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in mb["train"]] == list(range(1, 11))
    for ra, rb in zip(ma["train"], mb["train"], strict=True):
        for key in ("loss", "loss_action", "loss_rationale", "lr"):
            if ra[key] is None:  # a step whose samples all had their rationale dropped
                assert rb[key] is None
            else:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (key, ra, rb)
    assert [v["step"] for v in mb["val"]] == [5, 10]
    for va, vb in zip(ma["val"], mb["val"], strict=True):
        assert vb["action_l1"] == pytest.approx(va["action_l1"], rel=1e-6)
        assert vb["action_token_accuracy_teacher_forced"] == va["action_token_accuracy_teacher_forced"]


# ---- several processes ----------------------------------------------------------------------------------------------
def _parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    from refinevla_core.model.checkpoint import load_checkpoint

    return {n: p.detach().double() for n, p in load_checkpoint(checkpoint).vlm.named_parameters()}


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                         initial: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b - initial||: how far two runs' weights are apart, relative to how far training moved them."""
    apart = sum(float((a[n] - b[n]).pow(2).sum()) for n in b)
    moved = sum(float((b[n] - initial[n]).pow(2).sum()) for n in b)
    return (apart / moved) ** 0.5


def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(small_dataset, tmp_path):
    """Two processes as one DDP job (torchrun + accelerate over gloo on loopback; `accelerate launch --multi_gpu`
    starts GPU jobs through the same torch launcher) from the same entry point: 2 processes x batch 2 see the same
    frames per step as 1 process x batch 4 and, with λ_r = 0 (every sample has exactly 7 action tokens, so the mean
    of the per-process means is the global mean), must take the same steps.

    Not compared element by element at a fixed atol: the all-reduce sums in another order than one process does, and
    Adam divides each gradient by its own running RMS, so an element whose gradient is within rounding of zero can
    take an lr-sized step either way (2.2e-5 on 1 of 65,536 elements on an AMD EPYC). What the maths does bound:
      - no element can differ by more than twice the distance Adam can travel: 2 · Σ_k lr_k · 1.01 (with β = (0.9,
        0.999) the bias-corrected |m̂/√v̂| stays below 1.01 in the first steps);
      - the runs' weights agree to 1 % of how far training moved them (normwise): rounding flips only the few
        near-zero gradients. A real fault (unsynchronised ranks, a wrong data shard) changes most of the update:
        the negative control, one process with batch 2 (other frames), is ~85 % apart;
      - the loss trajectories agree (same frames, same forward).
    """
    settings = {"max_steps": 3, "lambda_rationale": 0.0, "rationale_dropout": 0.0}
    one_config = config_for(small_dataset, tmp_path / "one", batch_size=4, **settings)
    initial = {n: p.detach().double() for n, p in build_model(one_config).vlm.named_parameters()}
    train(one_config, log=quiet)
    train(config_for(small_dataset, tmp_path / "other_frames", batch_size=2, **settings), log=quiet)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "refinevla_core", "train",
               "--config", str(CONFIG_DIR / "train_tiny.yaml"),
               f"dataset={small_dataset}", f"output_dir={tmp_path / 'two'}", "batch_size=2", "lr=3e-3",
               "warmup_steps=0", "log_every=1", "val_fraction=0", "torch_threads=1", "progress_bar=false",
               *(f"{k}={v}" for k, v in settings.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr and r.stdout.count('"final_checkpoint"') == 1, "rank 0 reports, once"

    one, two = _parameters(tmp_path / "one" / "final"), _parameters(tmp_path / "two" / "final")
    steps = settings["max_steps"]
    travel = sum(one_config.lr * 0.5 * (1 + np.cos(np.pi * k / steps)) for k in range(steps))  # cosine, no warm-up
    for name in one:
        assert float((two[name] - one[name]).abs().max()) <= 2 * 1.01 * travel, name
        assert float((one[name] - initial[name]).abs().max()) <= 1.01 * travel, name
    assert _relative_difference(two, one, initial) < 0.01
    other_frames = _parameters(tmp_path / "other_frames" / "final")
    assert _relative_difference(other_frames, one, initial) > 0.1, "the check above can fail"

    h1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["train"]
    h2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["train"]
    assert [r["loss_action"] for r in h2] == pytest.approx([r["loss_action"] for r in h1], rel=1e-4)


def test_sharded_training_is_refused_with_the_alternative_named():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from refinevla_core.training.build import check_distributed_type

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distributed_type(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):  # FSDP is supported: test_fsdp.py
        with pytest.raises(ConfigError, match=r"not supported .*accelerate launch --multi_gpu"):
            check_distributed_type(SimpleNamespace(distributed_type=kind))


def test_stage_two_continues_from_a_previous_run_with_another_target_order(small_dataset, tmp_path):
    """The paper's recipe on our models: a base VLA trained before (stage 1, here 2 steps of full training), then
    selective transfer with the joint loss from its checkpoint; a third stage starts from the untied head stage 2
    wrote."""
    from refinevla_core.model.checkpoint import load_checkpoint

    stage1 = train(config_for(small_dataset, tmp_path / "s1", max_steps=2, lambda_rationale=0.0), log=quiet)
    base = load_checkpoint(stage1.final_checkpoint).vlm
    stage2 = train(config_for(small_dataset, tmp_path / "s2", max_steps=2, base_checkpoint=str(stage1.final_checkpoint),
                              target_order="action_then_rationale", **SELECTIVE), log=quiet)
    tuned = load_checkpoint(stage2.final_checkpoint)
    assert tuned.refinevla_config.target_order == "action_then_rationale"
    assert not tuned.vlm.config.tie_word_embeddings, "new-token rows trained in the head: saved untied"
    before, after = dict(base.named_parameters()), dict(tuned.vlm.named_parameters())
    for frozen in ("model.vision_tower.post_layernorm.weight", "model.language_model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(after[frozen], before[frozen]), frozen
    trained = "model.language_model.layers.3.mlp.up_proj.weight"
    assert not torch.equal(after[trained], before[trained])
    stage3 = train(config_for(small_dataset, tmp_path / "s3", max_steps=1, base_checkpoint=str(stage2.final_checkpoint),
                              **SELECTIVE), log=quiet)
    again = load_checkpoint(stage3.final_checkpoint).vlm
    ids = new_token_ids(tuned)
    others = torch.ones(again.lm_head.weight.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(again.lm_head.weight[others], tuned.vlm.lm_head.weight[others]), "the untied head stays frozen"


def test_stage_two_keeps_the_base_action_bins_unless_told_otherwise(tmp_path):
    """Re-fitting the statistics on the target data re-maps every action token the base learnt; by default (auto)
    stage 2 keeps the base's, says so with the share of clipped values, and warns when that share is large."""
    from refinevla_core.model.checkpoint import load_checkpoint

    same = tmp_path / "same"  # 200 frames: q01/q99 leave ~2 % of the values outside, as on real data
    make_dataset(same, episodes=8, length=25)
    stage1 = train(config_for(same, tmp_path / "s1", max_steps=1, lambda_rationale=0.0), log=quiet)
    base_stats = load_checkpoint(stage1.final_checkpoint).stats
    wider = tmp_path / "wider"  # another robot's data: actions 10x larger than the base's
    make_dataset(wider, episodes=4, length=25, seed=1)
    ds = EpisodeDataset(wider)
    scaled = EpisodeDataset.create(tmp_path / "scaled", name="scaled")
    for i in range(len(ds)):
        ep = ds.load_episode(i)
        scaled.append(Episode(images=ep.images, actions=ep.actions * np.float32([10, 10, 10, 1, 1, 1, 1]),
                              instruction=ep.instruction, task=ep.task))
    compute_dataset_stats(scaled)

    def stage2(name: str, dataset: Path, **overrides) -> tuple[object, list[str]]:
        messages: list[str] = []
        result = train(config_for(dataset, tmp_path / name, max_steps=1, base_checkpoint=str(stage1.final_checkpoint),
                                  lambda_rationale=0.0, **overrides), log=messages.append)
        return load_checkpoint(result.final_checkpoint).stats, messages

    kept, messages = stage2("auto", same)
    assert kept.allclose(base_stats)
    (said,) = [m for m in messages if m.startswith("action statistics: the base's")]
    assert float(said.split("meaning; ")[1].split("%")[0]) <= 3.0  # the base's own data: its 1 % tails, per side
    assert not any(m.startswith("warning: over") for m in messages)
    kept, messages = stage2("auto_wider", scaled.root)
    assert kept.allclose(base_stats) and any(m.startswith("warning: over 5%") for m in messages)
    refit, _ = stage2("dataset", scaled.root, action_stats="dataset")
    assert not refit.allclose(base_stats) and refit.q99[0] > base_stats.q99[0]
    with pytest.raises(ConfigError, match="action_stats=base needs a base_checkpoint"):
        train(config_for(same, tmp_path / "none", action_stats="base"), log=quiet)
    with pytest.raises(ConfigError, match="action_stats"):
        config_for(same, tmp_path / "typo", action_stats="bsae")


def test_epochs_set_the_number_of_steps(small_dataset, tmp_path):
    # 8 training frames, batch 4: 2 batches per epoch; 1.5 epochs with accumulation 1 -> 3 optimizer steps
    result = train(config_for(small_dataset, tmp_path / "run", max_steps=None, epochs=1.5), log=quiet)
    assert result.metrics["total_steps"] == 3 and [r["step"] for r in result.metrics["train"]] == [1, 2, 3]


def quadrant_dataset(root: Path, episodes: int = 24, length: int = 8) -> None:
    """Fully observable and easy: the lit quadrant of the image sets dx and dy (±0.06 m, some labels at the ±0.1 m
    clip like the expert's); rotations and gripper constant. A model that reads the image beats the mean action by
    far; one that learnt the marginal (or decodes its mode, the clip) does not."""
    rng = np.random.default_rng(0)
    ds = EpisodeDataset.create(root, name="quadrants", fps=5.0)
    for _ in range(episodes):
        images = np.zeros((length, 56, 56, 3), np.uint8)
        actions = np.zeros((length, 7), np.float32)
        actions[:, 6] = 1.0
        for t in range(length):
            right, low = rng.integers(0, 2, 2)
            images[t, 28 * low : 28 * low + 28, 28 * right : 28 * right + 28] = 255
            actions[t, 0] = (0.06 if right else -0.06) * (1 + 0.66 * (t % 4 == 0))  # every 4th label at the clip
            actions[t, 1] = -0.06 if low else 0.06
        ds.append(Episode(images=images, actions=actions, instruction="move to the light"))
    compute_dataset_stats(ds)


def test_a_tiny_model_learns_an_easy_fully_observable_task_better_than_the_mean_action(tmp_path):
    """Regression test for the demo that learnt nothing (its actions were worse than the mean action's): trained a
    few hundred steps, the tiny preset's actions - decoded as the policy decodes them - must halve the mean action's
    translation error on held-out episodes."""
    quadrant_dataset(tmp_path / "ds")
    cfg = config_for(tmp_path / "ds", tmp_path / "run", max_steps=250, batch_size=16, lr=2e-3, warmup_steps=20,
                     val_fraction=0.2, eval_every=250, lambda_rationale=0.0)
    val = train(cfg, log=quiet).metrics["val"][-1]
    assert val["action_l1_xyz"] < 0.5 * val["action_l1_xyz_mean_action"], val
