"""The demo report on a fixed set of stage results: which numbers land in which table, which sentences the numbers
allow, and which files the page links to. The report of a real (quick) run is checked in test/sim/test_demo.py."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refinevla_core.demo.report import SECTIONS, write_report
from refinevla_core.eval.stats import success_rate
from test.core.annotation_util import make_dataset

ROS_VIA = "ROS: sim_bridge_node + policy_node"


def _rate(k: int, n: int, **extra) -> dict:
    r = success_rate(k, n)
    return {"successes": k, "trials": n, "success_rate": r.rate, "wilson95": [r.low, r.high], "text": r.text(),
            "mean_steps": 30.5, "episodes": [{"seed": s} for s in range(n)], **extra}


def _l1(x: float) -> dict:
    return {"l1": x / 2, "l1_xyz": x}


def _model_eval(k: int, rationale_texts: list[str]) -> dict:
    return _rate(k, 20, via=ROS_VIA, rationale_mode="every_n", final_successes=k,
                 policy_node_latency_ms={"n": 600, "mean": 80.0, "p50": 70.0, "p90": 120.0},
                 rationale_examples=[{"seed": 1000, "step": 10 * i, "text": t} for i, t in enumerate(rationale_texts)])


def _analysis(root: Path, name: str, order: str, diagnostic: dict, generated: str) -> dict:
    overlay = root / "analysis" / name / "example_0.png"
    overlay.parent.mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(overlay)
    example = {"episode": 1, "frame": 2, "instruction": "push the red cube to the target 1",
               "teacher_rationale": "Observation: a red cube <full>", "teacher_target": "Observation: a red cube",
               "label_action": [0.01, -0.02, 0.0, 0, 0, 0, 1], "action": [0.02, -0.01, 0.0, 0, 0, 0, 1],
               "generated_rationale": generated, "attention_png": str(overlay)}
    return {"target_order": order, "has_rationale": order == "rationale_then_action", "parameters": 2_500_000,
            "diagnostic": diagnostic, "examples": [example],
            "latency": [{"mode": "action_only", "steps": 5, "mean_ms": 50.0, "median_ms": 49.0, "p90_ms": 60.0,
                         "ratio_vs_action_only": 1.0}]}


def _train(root: Path, name: str, order: str, curve: bool) -> dict:
    folder = root / "train" / name
    folder.mkdir(parents=True)
    rationale = None if order == "action_then_rationale" else 1.5
    (folder / "metrics.json").write_text(json.dumps({
        "train": [{"step": s, "loss_action": 3.0 / s, "loss_rationale": rationale} for s in (1, 2, 3)],
        "val": [{"step": 3, "val_loss_action": 1.2}]}))
    if curve:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "loss_curve.png")
    return {"metrics": str(folder / "metrics.json"), "loss_curve": str(folder / "loss_curve.png"), "steps": 3,
            "train_seconds": 12.34, "target_order": order,
            "last_train": {"loss_action": 1.0, "loss_rationale": rationale},
            "last_val": {"action_l1_xyz": 0.03, "action_l1_xyz_mean_action": 0.04, "action_l1_xyz_teacher_forced": 0.02,
                         "rationale_token_accuracy": 0.5}}


def fixed_context(root: Path, *, claims: bool = True) -> dict:
    """Two models (λ_r = 0, action first; rationale first), the pretrained base and both references."""
    make_dataset(root / "data", episodes=2, frames=4)
    models = [{"name": "baseline", "lambda_rationale": 0.0, "rationale_dropout": 1.0},
              {"name": "cot", "lambda_rationale": 1.0, "rationale_dropout": 0.5}]
    cot_diagnostic = {"frames": 8, "action_only": _l1(0.03), "generated": _l1(0.05), "teacher": _l1(0.01),
                      "mean_action": _l1(0.04), "distinct_actions": 5,
                      "rationales": {"frames": 8, "parse_rate": 0.75, "distinct_generated": 3,
                                     "most_common_share": 0.5, "phase_agreement": 0.625, "phase_base_rate": 0.5,
                                     "exact_match_teacher_target": 0.125}}
    return {
        "config": {"mode": "full" if claims else "quick", "claims": claims, "time_budget_s": 1200.0,
                   "train": {"models": models, "max_rationale_tokens": 48, "max_steps": 3}},
        "dataset": str(root / "data"),
        "collect": {"episodes": 2, "frames": 8, "expert_successes": 2, "seeds": [0, 1]},
        "annotate": {"frames_with_rationale": 8, "teacher": "sim:v2"},
        "train": {"baseline": _train(root, "baseline", "action_then_rationale", curve=True),
                  "cot": _train(root, "cot", "rationale_then_action", curve=False)},
        "eval": {"models": {"baseline": _model_eval(2, []), "cot": _model_eval(18, ["Observation: a red cube"])},
                 "references": {"expert": _rate(20, 20, via="in-process"), "random": _rate(0, 20, via="in-process")},
                 "base": {"checkpoint": "models/tiny-base", **_rate(1, 20, via=ROS_VIA)}},
        "analysis": {"baseline": _analysis(root, "baseline", "action_then_rationale",
                                           {"frames": 8, "action_only": _l1(0.03), "mean_action": _l1(0.04),
                                            "distinct_actions": 1}, ""),
                     "cot": _analysis(root, "cot", "rationale_then_action", cot_diagnostic, "Observation: a cube")},
        "stages": [{"name": "collect", "seconds": 60.0, "cpu_seconds": 90.0, "cached": True},
                   {"name": "train", "seconds": 240.0, "cpu_seconds": 450.0, "cached": False}],
        "machine": {"cpu": "test cpu", "cpu_count": 2, "cpu_affinity": 2},
        "load_average": [1.0, 1.5, 2.0, 0.5, 0.75, 1.0],
    }


@pytest.fixture
def full_report(tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "report"
    return out, write_report(out, fixed_context(tmp_path))


def test_pages_and_pictures(full_report):
    out, written = full_report
    assert written["html"] == str(out / "index.html") and written["md"] == str(out / "report.md")
    for png in (*written["pngs"], out / "example_0.png", out / "attention" / "cot_0.png",
                out / "loss_curve_baseline.png"):
        assert Image.open(png).size[0] > 0
    assert not (out / "loss_curve_cot.png").exists()  # the trainer drew none for it
    assert Image.open(out / "example_0.png").size == (48, 48)  # the 16 px frame, 3x
    page = (out / "index.html").read_text()
    positions = [page.index(f"<section id='{s}'>") for s in SECTIONS]
    assert positions == sorted(positions)


def test_markdown_tables_hold_the_numbers(full_report):
    out, _ = full_report
    md = (out / "report.md").read_text().splitlines()
    assert "| stage | wall seconds | CPU seconds (all processes) | this run |" in md
    assert "| train | 240.000 | 450.000 | ran |" in md and "| collect | 60.000 | 90.000 | cached (skipped) |" in md
    assert any("5.0 min (budget 20 min)" in line and "at least 4.5 min on 2 idle cores" in line for line in md)
    # λ_r = 0 trains no rationale: no rationale token accuracy for it
    assert ("| baseline | 0.000 | action_then_rationale | 1.000 | 3 | 12.300 | 1.000 | – | 0.030 | 0.040 | 0.020 "
            "| – |") in md
    assert ("| cot | 1.000 | rationale_then_action | 0.500 | 3 | 12.300 | 1.000 | 1.500 | 0.030 | 0.040 | 0.020 "
            "| 0.500 |") in md
    cot = success_rate(18, 20).text()
    assert f"| cot | {ROS_VIA}, rationale mode every_n | {cot} | 18 | 30.500 |" in md
    assert f"| expert (reference) | in-process | {success_rate(20, 20).text()} | – | 30.500 |" in md
    assert ("| baseline | action_then_rationale | 8 | 0.015 | – | n/a (no rationale trained) | 0.020 | "
            "0.0300 / – / – / 0.0400 |") in md
    assert ("| cot | rationale_then_action | 8 | 0.015 | 0.025 | 0.005 | 0.020 | "
            "0.0300 / 0.0500 / 0.0100 / 0.0400 |") in md
    assert "| cot | 8 | 0.750 | – | 3 | 0.500 | 0.625 | 0.500 | 0.125 |" in md
    assert "| cot | Policy in-process | action_only | 5 | 50.000 | 49.000 | 60.000 | 1.000 |" in md
    assert "| cot | policy_node, closed loop | every_n (all steps) | 600 | 80.000 | 70.000 | 120.000 | – |" in md
    assert "- cpu: test cpu" in md


def test_claims_follow_the_fixed_numbers(full_report):
    out, _ = full_report
    report = json.loads((out / "report.json").read_text())
    claims = report["claims_text"]
    assert any(c.startswith("cot succeeded more often than baseline") for c in claims)
    assert any(c.startswith("cot vs the pretrained base alone") and "raised success" in c for c in claims)
    assert any("baseline: the same action for every one of the validation frames" in c for c in claims)
    page = (out / "index.html").read_text()
    for claim in claims:
        assert html.escape(claim) in page
    assert report["total_seconds"] == 300.0 and report["total_cpu_seconds"] == 540.0
    assert "episodes" not in report["success"]["cot"]  # per-episode records stay in the eval folder
    assert list(report["success"]) == ["baseline", "cot", "pretrained base alone (reference)", "expert (reference)",
                                       "random (reference)"]
    assert "Observation: a red cube" in page and "(no rationale: λ_r = 0)" in page


def test_quick_report_makes_no_claim(tmp_path):
    context = fixed_context(tmp_path, claims=False)
    context["eval"]["models"]["cot"]["rationale_examples"] = []
    out = tmp_path / "report"
    write_report(out, context)
    page = (out / "index.html").read_text()
    assert "makes none" in page and "Quick mode: a model trained for a few dozen steps" in page
    assert "policy_node published no rationale text in these episodes." in page
    assert "# refinevla demo — quick run" in (out / "report.md").read_text()
