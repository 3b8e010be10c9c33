"""FSDP through accelerate: two CPU processes (gloo on loopback) sharding the tiny model, launched with the
environment `accelerate launch --config_file config/accelerate_fsdp.yaml` exports, end at the weights of one process
with the same global batch.

Why SGD: AdamW divides each update by the gradient's running RMS, so an element whose gradient is pure rounding noise
(reduction order differs between 2 shards and 1 process) still moves by ~lr, in either direction — equality of Adam
runs cannot be tested below lr (issue 15: the DDP test failed on AMD that way). SGD moves each element by lr * g:
rounding noise stays rounding-sized, while a real sharding bug (gradients summed instead of averaged, a shard missing
from the clip norm, a stale shard) changes the update by O(1) of its size. So the updates Δw must agree to a small
fraction of the largest update.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refinevla_core.training.config import CONFIG_DIR, load_train_config
from refinevla_core.training.trainer import build_model, train
from test.core.training_support import assert_same_updates, make_dataset, updates

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"max_steps": 3, "lambda_rationale": 0.0, "rationale_dropout": 0.0, "optimizer": "sgd", "lr": 0.1,
            "warmup_steps": 0, "log_every": 1, "val_fraction": 0.0, "torch_threads": 1, "progress_bar": False}


def accelerate_launch_env(config_file: Path, num_processes: int) -> dict[str, str]:
    """The variables `accelerate launch --config_file <file>` exports to its processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes",
                                               str(num_processes), "--mixed_precision", "no", "-m", "x"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_fsdp_on_two_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    make_dataset(tmp_path / "ds", episodes=2, length=4)
    settings = {**SETTINGS, "dataset": str(tmp_path / "ds")}
    config = load_train_config(CONFIG_DIR / "train_tiny.yaml", {**settings, "output_dir": str(tmp_path / "one"),
                                                                 "batch_size": 4})
    initial = build_model(config).vlm.state_dict()
    train(config, log=lambda _m: None)
    env = {**os.environ, **accelerate_launch_env(CONFIG_DIR / "accelerate_fsdp.yaml", 2), "OMP_NUM_THREADS": "1"}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(29500 + (os.getpid() + 500) % 1000), "-m", "refinevla_core", "train",
               "--config", str(CONFIG_DIR / "train_tiny.yaml"), f"output_dir={tmp_path / 'two'}", "batch_size=2",
               *(f"{k}={v}" for k, v in settings.items())]
    r = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr and r.stdout.count('"final_checkpoint"') == 1
    assert_same_updates(updates(initial, tmp_path / "one" / "final"), updates(initial, tmp_path / "two" / "final"))
    h1 = json.loads((tmp_path / "one" / "metrics.json").read_text())["train"]
    h2 = json.loads((tmp_path / "two" / "metrics.json").read_text())["train"]
    assert [r["loss_action"] for r in h2] == pytest.approx([r["loss_action"] for r in h1], rel=1e-4)
    assert (tmp_path / "two" / "checkpoints" / "step-00000003" / "trainer_state").is_dir()


@pytest.mark.slow
def test_pi0_full_fine_tuning_under_fsdp_writes_a_policy_checkpoint(tmp_path):
    """π0 (expert attending to the VLM's cache) sharded with config/accelerate_fsdp_pi0.yaml: it trains and exports a
    checkpoint that Policy loads and acts with. (No equality check: each process draws its own flow noise.)"""
    import numpy as np

    from refinevla_core.inference.policy import Policy

    make_dataset(tmp_path / "ds", episodes=3, length=5)
    env = {**os.environ, **accelerate_launch_env(CONFIG_DIR / "accelerate_fsdp_pi0.yaml", 2), "OMP_NUM_THREADS": "1"}
    full = {"freeze.vision": False, "freeze.projector": False, "freeze.embeddings": False,
            "freeze.language_layers": 0, "max_steps": 2, "warmup_steps": 0, "val_fraction": 0.0,
            "torch_threads": 1, "progress_bar": False}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(29500 + (os.getpid() + 700) % 1000), "-m", "refinevla_core", "train",
               "--config", str(CONFIG_DIR / "train_pi0_tiny.yaml"), f"dataset={tmp_path / 'ds'}",
               f"output_dir={tmp_path / 'run'}", "batch_size=2", *(f"{k}={v}" for k, v in full.items())]
    r = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stderr
    policy = Policy.from_checkpoint(tmp_path / "run" / "final")
    assert np.isfinite(policy.predict(np.zeros((64, 64, 3), np.uint8), "push the cube").action).all()


def test_lora_under_fsdp_and_deepspeed_are_refused_with_the_alternative_named():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from refinevla_core.config import ConfigError
    from refinevla_core.training.build import check_distributed_type
    from refinevla_core.training.fsdp import prepare_fsdp

    lora = SimpleNamespace(lora=SimpleNamespace(enabled=True))
    with pytest.raises(ConfigError, match=r"lora\.enabled is not supported with FSDP"):
        prepare_fsdp(SimpleNamespace(distributed_type=DistributedType.FSDP, mixed_precision="no"), lora)
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP):
        check_distributed_type(SimpleNamespace(distributed_type=kind))
    with pytest.raises(ConfigError, match=r"not supported .*accelerate_fsdp\.yaml"):
        check_distributed_type(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
