"""bf16 training keeps fp32 master weights: no update is rounded away, and the loss curve tracks the fp32 run.

The tiny preset is loaded in bf16 (as the real-size presets are) and trained with precision bf16 (autocast). The
learning rate 2e-5 is in the range a warm-up or cosine tail spends many steps in; at that rate a bf16 weight of size
~0.02 cannot represent the update (half its ulp is |w| * 2^-9 ~ 4e-5), which is what the checks below would see
without the fp32 copies (the negative control runs that case and must fail them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from refinevla_core.training import precision
from refinevla_core.training.config import CONFIG_DIR, load_train_config
from refinevla_core.training.precision import apply_training_precision, smallest_visible_adam_step, trainable_dtypes
from refinevla_core.training.trainer import Trainer
from test.core.training_support import make_dataset

SELECTIVE = {"freeze.vision": True, "freeze.projector": True, "freeze.embeddings": True, "freeze.language_layers": 2}
LR = 2e-5
BF16_UNIT_ROUNDOFF = 2.0**-8  # relative spacing of bf16 numbers (8 significant bits)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("precision")
    make_dataset(root / "ds", episodes=2, length=4)
    spec = yaml.safe_load((CONFIG_DIR / "model_tiny.yaml").read_text())
    spec["dtype"] = "bfloat16"
    (root / "model_tiny_bf16.yaml").write_text(yaml.safe_dump(spec))
    return {"dataset": root / "ds", "bf16_preset": root / "model_tiny_bf16.yaml"}


def config(setup: dict[str, Path], out: Path, *, bf16: bool, steps: int = 1):
    return load_train_config(CONFIG_DIR / "train_tiny.yaml", {
        "dataset": str(setup["dataset"]), "output_dir": str(out), "max_steps": steps, "batch_size": 4, "lr": LR,
        "warmup_steps": 0, "schedule": "constant", "log_every": 1, "eval_every": 1000, "save_every": 1000,
        "progress_bar": False, "torch_threads": 1, "val_fraction": 0.0,
        "preset": str(setup["bf16_preset"]) if bf16 else "tiny", "precision": "bf16" if bf16 else "fp32", **SELECTIVE,
    })


def first_step_changes(trainer: Trainer) -> tuple[int, int, int]:
    """(elements that must change, of those the ones that did, of those the ones bf16 weights could represent)."""
    trainer.setup()
    vlm = trainer.refinevla.vlm
    params = {n: p for n, p in vlm.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    grads: dict[str, torch.Tensor] = {}

    def grab(*_args) -> None:  # after clipping, right before AdamW applies them
        grads.update({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})

    trainer.optimizer.optimizer.register_step_pre_hook(grab)
    trainer.train_step(trainer.batches())
    must = changed = representable_in_bf16 = 0
    for name, p in params.items():
        # Adam's first step is lr * g / (|g| + 1e-8): ~lr wherever |g| >> 1e-8; it must then move the element when lr
        # exceeds half the fp32 spacing around it
        has_gradient = grads[name].abs() > 1e-6
        needed = has_gradient & smallest_visible_adam_step(before[name].float(), LR)
        must += int(needed.sum())
        changed += int((needed & (p.detach() != before[name])).sum())
        representable_in_bf16 += int((needed & smallest_visible_adam_step(before[name].bfloat16(), LR)).sum())
    return must, changed, representable_in_bf16


def test_bf16_run_keeps_trainable_weights_in_fp32_and_changes_every_element_with_a_gradient(setup, tmp_path):
    trainer = Trainer(config(setup, tmp_path / "run", bf16=True), log=lambda _m: None)
    must, changed, representable = first_step_changes(trainer)
    vlm = trainer.refinevla.vlm
    assert trainable_dtypes(vlm) == {torch.float32: sum(p.numel() for p in vlm.parameters() if p.requires_grad)}
    assert vlm.model.vision_tower.get_input_embeddings().weight.dtype == torch.bfloat16, "frozen weights stay bf16"
    assert must > 100_000
    assert changed == must, f"{must - changed} of {must} updates were lost"
    # the regime matters: in bf16 storage most of these updates would have been rounded away
    assert representable < 0.5 * must


def test_without_fp32_master_weights_the_same_check_fails(setup, tmp_path, monkeypatch):
    """Negative control: pure bf16 storage (the old behaviour) loses most of the first step's updates."""
    monkeypatch.setattr(precision, "apply_training_precision", lambda model, p: precision.PrecisionReport(p))
    must, changed, _ = first_step_changes(Trainer(config(setup, tmp_path / "run", bf16=True), log=lambda _m: None))
    assert changed < 0.5 * must


def curve(setup: dict[str, Path], out: Path, bf16: bool) -> np.ndarray:
    trainer = Trainer(config(setup, out, bf16=bf16, steps=10), log=lambda _m: None)
    return np.array([row["loss"] for row in trainer.run().metrics["train"]])


def test_bf16_loss_curve_tracks_the_fp32_run(setup, tmp_path, monkeypatch):
    """Same init (the bf16 model is the fp32 one rounded), same batches. Autocast computes the logits in bf16, so a
    loss value carries a relative error of about one bf16 unit (2^-8); a run whose updates all land stays within that
    band of the fp32 curve on average, while a run that loses its updates drifts out of it (the negative control)."""
    fp32 = curve(setup, tmp_path / "fp32", bf16=False)
    bf16 = curve(setup, tmp_path / "bf16", bf16=True)
    tolerance = 0.5 * BF16_UNIT_ROUNDOFF * fp32[0]
    assert fp32[0] - fp32[-3:].mean() > 2 * tolerance, "the fp32 run must learn visibly at this lr"
    assert abs(bf16[0] - fp32[0]) < tolerance
    assert np.abs(bf16 - fp32).mean() < tolerance, (fp32, bf16)

    monkeypatch.setattr(precision, "apply_training_precision", lambda model, p: precision.PrecisionReport(p))
    lossy = curve(setup, tmp_path / "pure_bf16", bf16=True)
    assert np.abs(lossy - fp32).mean() > tolerance, (fp32, lossy)


def test_precision_fp32_upcasts_everything_and_ties_survive():
    from test.core.training_support import tiny_paligemma

    model = tiny_paligemma().to(torch.bfloat16)
    model.model.vision_tower.requires_grad_(False)
    report = apply_training_precision(model, "bf16")
    assert report.frozen_low_precision > 0 and report.upcast_trainable > 0
    assert model.model.vision_tower.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.get_input_embeddings().weight, "the tie survives"
    assert model.lm_head.weight.dtype == torch.float32
    report = apply_training_precision(model, "fp32")
    assert report.upcast_frozen > 0 and {p.dtype for p in model.parameters()} == {torch.float32}
