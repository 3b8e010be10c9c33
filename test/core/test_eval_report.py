"""Evaluation reports name each policy by its run, not by the `final` folder every run's model is saved in."""

from __future__ import annotations

from refinevla_core.eval.report import run_name


def test_a_checkpoint_is_named_by_its_run(tmp_path):
    assert run_name(tmp_path / "runs" / "tiny" / "final") == "tiny"
    assert run_name(tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000200") == "tiny@step-00000200"
    assert run_name(tmp_path / "models" / "my_vla") == "my_vla"
    assert run_name("runs/mid/final/") == "mid"
