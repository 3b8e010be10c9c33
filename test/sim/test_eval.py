"""Evaluation: Wilson intervals, the SimplerEnv-style table, the in-process runner and its report (JSON, Markdown,
HTML, plots, captioned videos), and the `refinevla eval` command."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from refinevla_core.cli import main as refinevla
from refinevla_core.eval.report import simpler_table, write_report
from refinevla_core.eval.runner import run_episode, summarise
from refinevla_core.eval.stats import success_rate, wilson_interval
from refinevla_core.sim.experts import ScriptedExpertPolicy


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(9, 30)
    assert lo < 9 / 30 < hi
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(11, 10)
    assert success_rate(9, 20).text() == "45.0% [25.8, 65.8] (9/20)"


def test_simpler_table_layout():
    table = simpler_table({"ours": {"A": success_rate(3, 4), "B": success_rate(1, 4)},
                           "baseline": {"A": success_rate(0, 4)}}, ["A", "B"])
    lines = table.splitlines()
    assert lines[0] == "| Policy | A | B | Average |"
    assert lines[2] == "| ours | 75.0% (3/4) | 25.0% (1/4) | 50.0% |"
    assert lines[3] == "| baseline | 0.0% (0/4) | - | 0.0% |"


class Talker:
    """A stand-in policy with the Policy interface that also 'explains' itself (for the caption)."""

    def __init__(self, backend):
        self.expert = ScriptedExpertPolicy(backend.privileged_state)
        self.resets = 0

    def reset(self):
        self.resets += 1

    def predict(self, image, instruction):
        assert image.shape == (64, 64, 3) and instruction
        out = self.expert.predict(image, instruction)
        out.rationale_text = f"I see a {image.shape[0]} px image; {out.rationale_text}"
        return out


@pytest.mark.sim
def test_runner_and_report(tmp_path, push_cube):
    policy = Talker(push_cube)
    results = [run_episode(policy, push_cube, seed, record_frames=seed == 7) for seed in (7, 8)]
    assert policy.resets == 2 and all(r.success for r in results)
    assert results[0].frames is not None and len(results[0].frames) == results[0].steps + 1
    assert len(results[0].captions) == results[0].steps and "64 px" in results[0].captions[0]

    payload = write_report(tmp_path, results, {"tasks": ["PushCube-v1"], "episodes": 2, "seed": 7},
                           policy_name="talker")
    summary = payload["summary"]["PushCube-v1"]
    assert (summary["successes"], summary["trials"]) == (2, 2)
    assert summary["wilson95"] == pytest.approx(list(wilson_interval(2, 2)))
    assert json.loads((tmp_path / "report.json").read_text()) == payload
    md = (tmp_path / "report.md").read_text()
    assert "| PushCube-v1 | 100.0% [34.2, 100.0] (2/2) |" in md and "| talker | 100.0% (2/2) | 100.0% |" in md
    assert "videos/PushCube-v1_seed7.mp4" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "success.png").stat().st_size > 1000 and (tmp_path / "steps.png").exists()
    with av.open(str(tmp_path / "videos" / "PushCube-v1_seed7.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == len(results[0].frames)
    assert frames[0].shape[1] == 256 and frames[0].shape[0] > 256  # the frame plus the caption panel
    assert np.abs(frames[0][256:].astype(int) - 20).max() > 100  # caption text was drawn on the panel
    assert summarise(results)["PushCube-v1"].mean_steps == pytest.approx(np.mean([r.steps for r in results]))


@pytest.mark.sim
def test_eval_command_random_floor_and_compare(tmp_path, capsys):
    out = tmp_path / "random"
    assert refinevla(["eval", "--policy", "random", "--tasks", "PushCube-v1", "--episodes", "2", "--seed", "3",
                      "--image-size", "64", "--max-steps", "4", "--videos", "0", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [e["steps"] for e in report["episodes"]] == [4, 4] and report["meta"]["policy"] == "random"
    assert "PushCube-v1: 0.0% [0.0, 65.8] (0/2)" in capsys.readouterr().out
    assert refinevla(["eval", "--compare", str(out / "report.json")]) == 0
    assert "| random | 0.0% (0/2) | 0.0% |" in capsys.readouterr().out
    assert refinevla(["eval", "--tasks", "PushCube-v1"]) == 2  # no checkpoint, no --policy
    assert "--checkpoint" in capsys.readouterr().err
