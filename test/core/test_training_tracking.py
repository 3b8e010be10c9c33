"""Training trackers (training/tracking.py): off by default, names checked, and a TensorBoard run written offline whose
event files hold the per-term losses, the learning rate and the validation metrics of metrics.json."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from refinevla_core.config import ConfigError, parse_overrides
from refinevla_core.training import tracking
from refinevla_core.training.config import CONFIG_DIR, load_train_config
from test.core.training_support import make_dataset


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from TensorBoard event files (TFRecord: length, crc, Event proto, crc)."""
    try:
        from tensorboardX.proto.event_pb2 import Event
    except ImportError:
        from tensorboard.compat.proto.event_pb2 import Event
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12: pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_trackers_are_off_by_default_and_their_names_are_checked():
    assert load_train_config(CONFIG_DIR / "train_tiny.yaml").report_to == "none"
    assert tracking.tracker_names("none") == [] and tracking.accelerator_kwargs("none", Path("x")) == {}
    assert tracking.tracker_names("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match=r"report_to: 'tensorbord' is not a tracker; choose none or any of"):
        load_train_config(CONFIG_DIR / "train_tiny.yaml", parse_overrides(["report_to=tensorbord"]))


def test_a_missing_tracker_package_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as on a machine without the package
    with pytest.raises(ConfigError, match=r"report_to=wandb needs wandb: pip install wandb"):
        tracking.check_installed(["wandb"])
    with pytest.raises(ConfigError, match=r"needs tensorboard or tensorboardX: pip install tensorboardX"):
        tracking.accelerator_kwargs("tensorboard", Path("run"))


def test_a_tensorboard_run_logs_the_loss_terms_lr_and_validation_offline(tmp_path):
    if not any(importlib.util.find_spec(m) for m in ("tensorboardX", "tensorboard")):
        pytest.skip("tensorboardX is not installed (./setup.sh installs it with the dev extras)")
    from refinevla_core.training.trainer import train

    dataset = tmp_path / "ds"
    make_dataset(dataset, episodes=3, length=4)
    out = tmp_path / "tiny_run"
    config = load_train_config(CONFIG_DIR / "train_tiny.yaml", {
        "dataset": str(dataset), "output_dir": str(out), "max_steps": 4, "batch_size": 2, "lr": 3e-3,
        "warmup_steps": 0, "log_every": 1, "eval_every": 2, "save_every": 1000, "val_fraction": 0.34,
        "progress_bar": False, "torch_threads": 1, "report_to": "tensorboard",
    })
    train(config, log=lambda _: None)

    scalars = read_scalars(out / tracking.TRACKING_DIR / "tiny_run")
    metrics = json.loads((out / "metrics.json").read_text())
    for entry in metrics["train"]:
        for key in ("loss", "loss_action", "lr"):
            assert scalars[f"train/{key}"][entry["step"]] == pytest.approx(entry[key], rel=1e-6), key
        if entry["loss_rationale"] is not None:
            assert scalars["train/loss_rationale"][entry["step"]] == pytest.approx(entry["loss_rationale"], rel=1e-6)
    assert [v["step"] for v in metrics["val"]] == [2, 4]
    for val in metrics["val"]:
        assert scalars["val/action_l1"][val["step"]] == pytest.approx(val["action_l1"], rel=1e-6)
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
