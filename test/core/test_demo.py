"""refinevla demo's parts that need no simulator: the config (full vs quick), the stage cache (skip, resume, redo),
the output-folder guard, the collection shards and the report's claims. The end-to-end run is test/sim/test_demo.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refinevla_core.config import ConfigError, parse_overrides
from refinevla_core.demo.cache import StageCache, fingerprint
from refinevla_core.demo.config import CollectSettings, load_demo_config
from refinevla_core.demo.data import shard_plan
from refinevla_core.demo.pipeline import DemoError, _check_out
from refinevla_core.demo.report import diagnostic_claims, success_claims


# ---- config ------------------------------------------------------------------------------------------------------
def test_quick_is_full_with_the_listed_differences():
    full, quick = load_demo_config(), load_demo_config(quick=True)
    assert full.mode == "full" and full.claims and quick.mode == "quick" and not quick.claims
    assert quick.collect.episodes < full.collect.episodes and quick.train.max_steps < full.train.max_steps
    # what quick does not list is the full run's: the same models, task and camera
    assert [m.name for m in quick.train.models] == [m.name for m in full.train.models]
    assert (quick.collect.task, quick.collect.image_size) == (full.collect.task, full.collect.image_size)
    orders = {m.target_order for m in full.train.models if m.has_rationale}
    assert orders == {"rationale_then_action", "action_then_rationale"}
    # the λ_r = 0 baseline, and the full fine-tune of the same base (what selective transfer costs or saves)
    assert [m.lambda_rationale for m in full.train.models if not m.has_rationale] == [0.0, 0.0]
    assert [m.extra for m in full.train.models if m.extra] == [{"freeze.vision": False, "freeze.projector": False,
                                                                 "freeze.embeddings": False,
                                                                 "freeze.language_layers": 0}]


def test_overrides_and_their_errors():
    config = load_demo_config(quick=True, overrides=parse_overrides(["train.max_steps=5", "eval.episodes=2"]))
    assert config.train.max_steps == 5 and config.eval.episodes == 2
    with pytest.raises(ConfigError, match="max_stpes"):
        load_demo_config(overrides=parse_overrides(["train.max_stpes=5"]))
    with pytest.raises(ConfigError, match="inside the collected seeds"):
        load_demo_config(overrides=parse_overrides(["eval.seed=10"]))


def test_config_file_needs_a_full_section(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("quick: {}\n")
    with pytest.raises(ConfigError, match="full"):
        load_demo_config(path)


# ---- stage cache -------------------------------------------------------------------------------------------------
def test_stage_is_skipped_resumed_or_redone(tmp_path):
    cache = StageCache(tmp_path, log=lambda m: None)
    out = tmp_path / "stage_out"
    calls = []

    def work(tag: str):
        def run():
            calls.append(tag)
            out.mkdir(exist_ok=True)
            (out / "file").write_text(tag)
            return {"tag": tag}
        return run

    first = cache.run("s", "fp1", [out], work("a"))
    assert not first.cached and first.result == {"tag": "a"}
    again = StageCache(tmp_path, log=lambda m: None).run("s", "fp1", [out], work("b"))
    assert again.cached and again.result == {"tag": "a"} and calls == ["a"]
    # a killed run: the marker says running -> same fingerprint resumes without removing the output
    marker = tmp_path / "stages" / "s.json"
    marker.write_text(json.dumps({"fingerprint": "fp1", "state": "running"}))
    (out / "partial").write_text("kept")
    StageCache(tmp_path, log=lambda m: None).run("s", "fp1", [out], work("c"))
    assert (out / "partial").exists() and calls == ["a", "c"]
    # another configuration: the old output is removed before the stage runs again
    StageCache(tmp_path, log=lambda m: None).run("s", "fp2", [out], work("d"))
    assert not (out / "partial").exists() and (out / "file").read_text() == "d"
    # a missing output is not a cache hit
    import shutil

    shutil.rmtree(out)
    assert not StageCache(tmp_path, log=lambda m: None).run("s", "fp2", [out], work("e")).cached


def test_group_runs_only_what_is_not_cached(tmp_path):
    cache = StageCache(tmp_path, log=lambda m: None)
    seen = []

    def work(names):
        seen.append(sorted(names))
        for n in names:
            (tmp_path / n.replace(":", "_")).mkdir()
        return {n: {"n": n} for n in names}

    items = {"t:a": ("1", [tmp_path / "t_a"]), "t:b": ("1", [tmp_path / "t_b"])}
    cache.run_group(items, work)
    items["t:b"] = ("2", [tmp_path / "t_b"])
    outcomes = StageCache(tmp_path, log=lambda m: None).run_group(items, work)
    assert seen == [["t:a", "t:b"], ["t:b"]]
    assert outcomes["t:a"].cached and not outcomes["t:b"].cached


def test_cache_never_removes_outside_the_demo_folder(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    cache = StageCache(tmp_path / "demo", log=lambda m: None)
    with pytest.raises(ValueError, match="outside the demo folder"):
        cache.run("s", "fp", [outside], lambda: {})
    assert outside.exists()


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_out_folder_guard(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not the demo's")
    with pytest.raises(DemoError, match="not empty"):
        _check_out(foreign)
    fresh = tmp_path / "new"
    _check_out(fresh, "quick")
    _check_out(fresh, "quick")  # a demo folder may be reused
    with pytest.raises(DemoError, match="holds a quick demo run"):
        _check_out(fresh, "full")


# ---- collection shards -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("episodes", "workers"), [(300, 2), (7, 3), (2, 4)])
def test_shards_cover_the_seeds_once_in_order(episodes, workers):
    plan = shard_plan(CollectSettings(episodes=episodes, seed=5, workers=workers))
    seeds = [s + i for s, n in plan for i in range(n)]
    assert seeds == list(range(5, 5 + episodes))
    assert len(plan) == min(workers, episodes)


# ---- claims ------------------------------------------------------------------------------------------------------
def _rate(k: int, n: int) -> dict:
    from refinevla_core.eval.stats import success_rate

    r = success_rate(k, n)
    return {"successes": k, "trials": n, "success_rate": r.rate, "wilson95": [r.low, r.high], "text": r.text()}


def test_claims_follow_the_intervals():
    overlap = success_claims({"a": _rate(3, 20), "b": _rate(5, 20)}, {}, claims=True)
    assert len(overlap) == 1 and "overlap" in overlap[0] and "does not show a difference" in overlap[0]
    apart = success_claims({"a": _rate(1, 30), "b": _rate(25, 30)}, {"expert": _rate(30, 30)}, claims=True)
    assert "b succeeded more often than a" in apart[0] and "do not overlap" in apart[0]
    assert "solvable" in apart[1]
    quick = success_claims({"a": _rate(1, 1)}, {}, claims=False)
    assert quick == [quick[0]] and "makes none" in quick[0]


def test_diagnostic_claim_orders_the_errors_and_calls_ties():
    def l1(x: float) -> dict:
        return {"l1": x, "l1_xyz": x}

    analyses = {"cot": {"diagnostic": {"frames": 8, "teacher": l1(0.1), "generated": l1(0.3), "action_only": l1(0.3),
                                       "mean_action": l1(0.4)}},
                "aux": {"diagnostic": {"frames": 8, "action_only": l1(0.2), "mean_action": l1(0.4)}}}
    (text,) = diagnostic_claims(analyses, claims=True)
    assert text.startswith("cot:") and "the teacher's rationale fed in (0.1000) <" in text and " = " in text


def test_repo_config_is_the_default():
    from refinevla_core.demo.config import DEFAULT_CONFIG

    assert Path(__file__).resolve().parents[2] / "config" / "demo.yaml" == DEFAULT_CONFIG
