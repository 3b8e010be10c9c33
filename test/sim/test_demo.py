"""`refinevla demo --quick` end to end, as CI runs it: real ManiSkill episodes, the sim teacher, three tiny models
trained for a few steps, closed-loop episodes through policy_node + sim_bridge_node processes over loopback DDS, the
offline diagnostics and the report — then a second run that must come entirely from the cache.

No number is asserted beyond "measured and present": quick mode makes no success-rate claim, and the report must
say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("run", "data", "training", "success", "diagnostic", "rationales", "attention", "latency", "limits")


def _demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "refinevla_core", "demo", "--quick", "--no-progress", "--out",
                           str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    if not os.environ.get("VK_ICD_FILENAMES") and not os.path.exists("/usr/share/vulkan/icd.d"):
        pytest.skip("no Vulkan driver: source .venv/refinevla_env.sh (./setup.sh installs lavapipe)")
    out = tmp_path_factory.mktemp("demo") / "quick"
    run = _demo(out)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-4000:]}\nstderr:\n{run.stderr[-6000:]}"
    return out, run


def test_every_stage_ran_and_announced_itself(quick_run):
    _, run = quick_run
    for i, stage in enumerate(("collect", "annotate", "train", "evaluate", "analyse", "report"), start=1):
        assert f"==> [{i}/6] {stage}" in run.stdout
    assert "stages run: collect, annotate, train, eval, analysis, report" in run.stdout


def test_report_has_every_section_and_its_pictures(quick_run):
    out, _ = quick_run
    page = (out / "report" / "index.html").read_text()
    for section in SECTIONS:
        assert f"<section id='{section}'>" in page
    assert "makes none" in page  # quick mode: no success-rate claim
    pngs = ["losses.png", "success.png", "attention.png", "example_0.png"]
    pngs += [f"attention/{m}_0.png" for m in ("baseline", "refinevla_cot", "refinevla_aux")]
    for name in pngs:
        path = out / "report" / name
        assert path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"src='{name}'" in page or name.startswith("attention/")


def test_report_json_holds_what_was_measured(quick_run):
    out, _ = quick_run
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["mode"] == "quick" and report["claims"] is False
    assert set(report["models"]) == {"baseline", "refinevla_cot", "refinevla_aux", "full_finetune"}
    for name, m in report["models"].items():
        assert m["trials"] == 1 and m["successes"] in (0, 1), name
        assert 0.0 <= m["wilson95"][0] <= m["wilson95"][1] <= 1.0
        via = report["success"][name]["via"]
        assert "policy_node" in via and "sim_bridge_node" in via
        assert report["success"][name]["policy_node_latency_ms"]["mean"] > 0
    assert set(report["references"]) == {"expert", "random"}
    base = report["success"]["pretrained base alone (reference)"]  # models/tiny-base through the same ROS lanes
    assert base["trials"] == 1 and "policy_node" in base["via"]
    in_process = [row for row in report["latency"] if row[1] == "Policy in-process"]
    assert in_process and all(row[4] > 0 for row in in_process)
    modes = {row[2] for row in in_process if row[0] == "refinevla_cot"}
    assert modes == {"action_only", "every_step", "every_10"}
    # rationales: the teacher's for the example frames, and the models' own for the same frames
    for name, examples in report["examples"].items():
        assert examples and examples[0]["teacher_rationale"].startswith("Observation:"), name
        assert examples[0]["teacher_target"] and examples[0]["attention_image_share"] > 0
        assert isinstance(examples[0]["generated_rationale"], str)
    for name in ("refinevla_cot", "refinevla_aux"):
        assert report["diagnostic"][name]["rationales"]["frames"] == 4
    cot = report["diagnostic"]["refinevla_cot"]
    assert {"action_only", "generated", "teacher", "mean_action"} <= set(cot)
    assert "teacher" not in report["diagnostic"]["baseline"]


def test_closed_loop_ran_through_the_nodes(quick_run):
    out, _ = quick_run
    for name in ("baseline", "refinevla_cot", "refinevla_aux"):
        (line,) = (out / "eval" / name / "episodes.jsonl").read_text().splitlines()
        record = json.loads(line)
        assert record["seed"] == 1000 and record["steps"] >= 1
        assert len(record["latency_ms"]) == record["steps"]  # every simulator step came from a policy_node Action
        log = (out / "eval" / name / "logs" / "policy_node.log").read_text()
        assert "active: control started" in log


def test_second_run_comes_from_the_cache(quick_run):
    out, _ = quick_run
    before = (out / "report" / "index.html").stat().st_mtime_ns
    again = _demo(out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "stages run: none (all cached)" in again.stdout
    for stage in ("collect", "annotate", "train:baseline", "eval:refinevla_aux", "analysis:refinevla_cot", "report"):
        assert f"{stage}: cached, skipped" in again.stdout
    assert (out / "report" / "index.html").stat().st_mtime_ns == before
