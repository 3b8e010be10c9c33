"""`refinevla demo` end to end: the six stages, their cache fingerprints, banners and progress, and the report.

    1 collect   scripted-expert episodes in ManiSkill3 (parallel simulator processes) + action statistics
    2 annotate  the simulator-privileged teacher writes a rationale for every frame
    3 train     the λ_r = 0 baseline and ReFineVLA's joint loss in both target orders, side by side
    4 evaluate  closed loop through policy_node + sim_bridge_node (separate processes, private loopback ROS domains);
                the scripted expert and a random policy in-process on the same seeds as references
    5 analyse   forced-rationale diagnostic, generated vs teacher rationales, attention overlays, latency per mode
    6 report    <out>/report/index.html (+ PNGs, report.json, report.md)

Every stage's fingerprint chains the fingerprints it reads from, so changing the collection redoes everything after
it, while changing one model's settings retrains and re-evaluates only that model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from refinevla_core.bench import machine_info
from refinevla_core.config import save_config, to_dict
from refinevla_core.demo import data as data_mod
from refinevla_core.demo import evaluate as eval_mod
from refinevla_core.demo import train as train_mod
from refinevla_core.demo.analysis import analyze_model
from refinevla_core.demo.cache import StageCache, StageOutcome, banner, fingerprint
from refinevla_core.demo.config import DemoConfig, ModelSettings
from refinevla_core.demo.report import write_report

MARKER = "refinevla_demo.json"
STAGES = ("collect", "annotate", "train", "eval", "analysis", "report")


class DemoError(RuntimeError):
    """The demo cannot go on; the message names the stage, the cause and where its log is."""


def _check_out(out: Path, mode: str = "full") -> None:
    """--out is new, empty, or a demo folder of the same mode: the demo removes stage folders and must never touch
    anything else (nor replace a full run's results with a quick run's)."""
    marker = out / MARKER
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise DemoError(f"{out} is not empty and was not made by `refinevla demo` (no {MARKER}); choose an empty or "
                        "new --out")
    if marker.is_file():
        try:
            have = json.loads(marker.read_text()).get("mode", mode)
        except json.JSONDecodeError:
            have = mode
        if have != mode:
            raise DemoError(f"{out} holds a {have} demo run; a {mode} run there would replace its results - choose "
                            "another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"made_by": "refinevla demo", "mode": mode}) + "\n")


def _stage(index: int, title: str, detail: str) -> None:
    banner(index, len(STAGES), title, detail)


def run_demo(config: DemoConfig, out: Path, progress: bool = True, until: str | None = None) -> dict[str, Any]:
    """Run (or resume) the demo into `out`; returns paths and the stage outcomes."""
    out = Path(out)
    _check_out(out, config.mode)
    save_config(config, out / "demo_config.yaml")
    run = DemoRun(config, out, progress)
    print(f"refinevla demo ({config.mode}) -> {out}", flush=True)
    result: dict[str, Any] = {"out": str(out), "stages": run.groups}
    for stage, step in (("collect", run.collect), ("annotate", run.annotate), ("train", run.train),
                        ("eval", run.evaluate), ("analysis", run.analyse)):
        step()
        if until == stage:
            return result
    reported = run.report()
    elapsed = time.perf_counter() - run.started
    ran = [g["name"] for g in run.groups if not g["cached"]]
    print(f"\nrefinevla demo ({config.mode}) finished in {elapsed / 60:.1f} min; stages run: "
          f"{', '.join(ran) or 'none (all cached)'}", flush=True)
    result.update({"report": reported["html"], "seconds": elapsed, "ran": ran})
    return result


@contextmanager
def _stage_failure(stage: str) -> Iterator[None]:
    """Any error of a stage becomes a DemoError naming the stage (the cause stays chained)."""
    try:
        yield
    except Exception as error:
        raise DemoError(f"stage {stage} failed: {error}") from error


class DemoRun:
    """One demo run into `out`: a method per stage runs it (or takes it from the cache) and keeps what the later
    stages read: results, and fingerprints that chain, so a change redoes only what depends on it."""

    def __init__(self, config: DemoConfig, out: Path, progress: bool) -> None:
        self.config, self.out, self.progress = config, out, progress
        self.load_start = os.getloadavg()
        self.started = time.perf_counter()
        self.cache = StageCache(out)
        self.data_dir, self.train_dir, self.eval_dir = out / "data", out / "train", out / "eval"
        self.analysis_dir, self.report_dir = out / "analysis", out / "report"
        self.models = config.train.models
        self.by_name = {m.name: m for m in self.models}
        self.groups: list[dict[str, Any]] = []  # one entry per stage for the report: seconds, CPU seconds, cached

    def record(self, name: str, outcomes: list[StageOutcome]) -> None:
        ran = [o for o in outcomes if not o.cached]
        self.groups.append({"name": name, "seconds": max((o.seconds for o in outcomes), default=0.0),
                            "cpu_seconds": max((o.cpu_seconds for o in outcomes), default=0.0), "cached": not ran})

    # 1 collect ------------------------------------------------------------------------------------------------
    def collect(self) -> None:
        c = self.config.collect
        _stage(1, "collect", f"{c.episodes} scripted-expert {c.task} episodes at {c.image_size} px, "
               f"{c.workers} simulator process(es)")
        identity = {k: v for k, v in to_dict(c).items() if k != "workers"}
        self.fp_collect = fingerprint("collect", identity, data_mod.collect_fingerprint_parts())
        with _stage_failure("collect"):
            self.collected = self.cache.run(
                "collect", self.fp_collect, [self.data_dir], lambda: data_mod.collect_dataset(
                    c, self.data_dir, self.out / "collect_shards", progress=self.progress),
                what=f"{c.episodes} episodes")
        self.record("collect", [self.collected])

    # 2 annotate -----------------------------------------------------------------------------------------------
    def annotate(self) -> None:
        _stage(2, "annotate", "simulator-privileged teacher, every frame")
        self.fp_annotate = fingerprint("annotate", self.fp_collect, data_mod.annotate_fingerprint_parts())
        outputs = [self.data_dir / "rationales.jsonl", self.data_dir / "annotations.sqlite"]
        with _stage_failure("annotate"):
            self.annotated = self.cache.run("annotate", self.fp_annotate, outputs,
                                            lambda: data_mod.annotate_with_sim_teacher(self.data_dir,
                                                                                       progress=self.progress))
        self.record("annotate", [self.annotated])

    # 3 train --------------------------------------------------------------------------------------------------
    def train(self) -> None:
        t, models = self.config.train, self.models
        _stage(3, "train", f"{len(models)} models x {t.max_steps} steps, {min(t.parallel, len(models))} at a "
               f"time, 1 thread each: " + ", ".join(m.name for m in models))
        self.fp_train = {m.name: fingerprint("train", self.fp_annotate, train_mod.train_fingerprint_parts(t, m))
                         for m in models}
        with _stage_failure("train"):
            trained = self.cache.run_group(
                {f"train:{m.name}": (self.fp_train[m.name], [self.train_dir / m.name]) for m in models},
                lambda names: {f"train:{n}": r for n, r in train_mod.train_models(
                    t, [self.by_name[n.split(":", 1)[1]] for n in names], self.data_dir, self.train_dir,
                    progress=self.progress).items()})
        self.record("train", list(trained.values()))
        self.train_results = {m.name: trained[f"train:{m.name}"].result for m in models}

    # 4 evaluate -----------------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        c, e, models = self.config.collect, self.config.eval, self.models
        _stage(4, "evaluate", f"{e.episodes} episode(s) per model through policy_node + sim_bridge_node "
               f"({min(e.lanes, len(models))} lane(s)); references in-process: {', '.join(e.references) or 'none'}")
        items = {f"eval:{m.name}": (fingerprint("eval", self.fp_train[m.name],
                                                eval_mod.eval_fingerprint_parts(m, c, e)), [self.eval_dir / m.name])
                 for m in models}
        self.checkpoints = {m.name: self.train_results[m.name]["checkpoint"] for m in models}
        base = eval_mod.base_reference(self.config.train, e)  # (ModelSettings, checkpoint) of the base, or None
        if base is not None:
            self.by_name[base[0].name], self.checkpoints[base[0].name] = base
            items[f"eval:{base[0].name}"] = (fingerprint("eval", eval_mod.checkpoint_fingerprint(base[1]),
                                                         eval_mod.eval_fingerprint_parts(base[0], c, e)),
                                             [self.eval_dir / base[0].name])
        if e.references:
            items["eval:references"] = (fingerprint("references", eval_mod.reference_fingerprint_parts(c, e)),
                                        [self.eval_dir / "references"])
        with _stage_failure("evaluate"):
            evaluated = self.cache.run_group(items, self._evaluate_pending)
        self.record("eval", list(evaluated.values()))
        self.eval_results = {"models": {m.name: evaluated[f"eval:{m.name}"].result for m in models},
                             "references": evaluated["eval:references"].result if e.references else {}}
        if base is not None:
            self.eval_results["base"] = {"checkpoint": str(base[1]), **evaluated[f"eval:{base[0].name}"].result}

    def _evaluate_pending(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """The closed-loop lanes for the models (and references) not taken from the cache."""
        e = self.config.eval
        todo = [self.by_name[n.split(":", 1)[1]] for n in names if n != "eval:references"]
        refs = e.references if "eval:references" in names else None
        got = eval_mod.evaluate_models(todo, {m.name: self.checkpoints[m.name] for m in todo}, self.config.collect, e,
                                       self.eval_dir, progress=self.progress, references=refs,
                                       reference_dir=self.eval_dir / "references")
        res = {f"eval:{n}": r for n, r in got["models"].items()}
        if refs:
            res["eval:references"] = got["references"]
        return res

    # 5 analyse ------------------------------------------------------------------------------------------------
    def analyse(self) -> None:
        a = self.config.analysis
        _stage(5, "analyse", f"forced-rationale diagnostic on {a.diagnostic_frames} validation frames, "
               f"{a.example_frames} example frame(s) with rationales and attention, latency over {a.latency_steps} "
               "steps per rationale mode")
        specs = {f"analysis:{m.name}": self._analysis_spec(m) for m in self.models}
        items = {n: (fingerprint("analysis", self.fp_train[s["name"]],
                                 {k: v for k, v in s.items() if k != "checkpoint"}, "v2"),
                     [self.analysis_dir / s["name"]]) for n, s in specs.items()}
        with _stage_failure("analyse"):
            analysed = self.cache.run_group(
                items, lambda names: _analyse([specs[n] for n in names], a.workers, self.progress))
        self.record("analysis", list(analysed.values()))
        self.analyses = {m.name: analysed[f"analysis:{m.name}"].result for m in self.models}

    def _analysis_spec(self, model: ModelSettings) -> dict[str, Any]:
        """What analyze_model needs for one model: its checkpoint, its validation split and the analysis settings."""
        a = self.config.analysis
        tc = train_mod.train_config(self.config.train, model, self.data_dir, self.train_dir / model.name)
        return {"name": model.name, "checkpoint": self.train_results[model.name]["checkpoint"],
                "dataset": str(self.data_dir), "val_fraction": tc.val_fraction, "split_seed": tc.seed,
                "has_rationale": model.has_rationale, "example_frames": a.example_frames,
                "diagnostic_frames": a.diagnostic_frames, "latency_steps": a.latency_steps,
                "every_n": self.config.eval.rationale_every_n, "out_dir": str(self.analysis_dir / model.name)}

    # 6 report -------------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        _stage(6, "report", f"{self.report_dir / 'index.html'}")
        fp_report = fingerprint("report", [o.fingerprint for o in self.cache.outcomes], "v3")
        with _stage_failure("report"):
            reported = self.cache.run("report", fp_report, [self.report_dir],
                                      lambda: write_report(self.report_dir, self.report_context()))
        self.record("report", [reported])
        return reported.result

    def report_context(self) -> dict[str, Any]:
        """The stages' results as write_report reads them, with the machine and the load before and now."""
        return {"config": to_dict(self.config), "dataset": str(self.data_dir), "collect": self.collected.result,
                "annotate": self.annotated.result, "train": self.train_results, "eval": self.eval_results,
                "analysis": self.analyses, "stages": self.groups, "machine": machine_info(),
                "load_average": [round(v, 2) for v in (*self.load_start, *os.getloadavg())]}


def _analyse(specs: list[dict[str, Any]], workers: int, progress: bool) -> dict[str, dict[str, Any]]:
    results = {}
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(specs))), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(analyze_model, s): s["name"] for s in specs}
        with tqdm(total=len(specs), desc="analyse", unit="model", disable=not progress, file=sys.stderr) as bar:
            for future in as_completed(futures):
                results[f"analysis:{futures[future]}"] = future.result()
                bar.update(1)
    return results
