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
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from refinevla_core.config import save_config, to_dict
from refinevla_core.demo.cache import StageCache, banner, fingerprint
from refinevla_core.demo.config import DemoConfig

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
    from refinevla_core.demo import data as data_mod
    from refinevla_core.demo import evaluate as eval_mod
    from refinevla_core.demo import train as train_mod
    from refinevla_core.demo.report import write_report

    out = Path(out)
    _check_out(out, config.mode)
    save_config(config, out / "demo_config.yaml")
    load_start = os.getloadavg()
    started = time.perf_counter()
    cache = StageCache(out)
    data_dir, train_dir, eval_dir = out / "data", out / "train", out / "eval"
    analysis_dir, report_dir = out / "analysis", out / "report"
    models = config.train.models
    print(f"refinevla demo ({config.mode}) -> {out}", flush=True)
    groups: list[dict[str, Any]] = []

    def record(name: str, outcomes: list[Any]) -> None:
        ran = [o for o in outcomes if not o.cached]
        groups.append({"name": name, "seconds": max((o.seconds for o in outcomes), default=0.0),
                       "cpu_seconds": max((o.cpu_seconds for o in outcomes), default=0.0), "cached": not ran})

    def fail(stage: str, error: Exception) -> DemoError:
        return DemoError(f"stage {stage} failed: {error}")

    # 1 collect ------------------------------------------------------------------------------------------------
    c = config.collect
    _stage(1, "collect", f"{c.episodes} scripted-expert {c.task} episodes at {c.image_size} px, "
           f"{c.workers} simulator process(es)")
    identity = {k: v for k, v in to_dict(c).items() if k != "workers"}
    fp_collect = fingerprint("collect", identity, data_mod.collect_fingerprint_parts())
    try:
        collect = cache.run("collect", fp_collect, [data_dir], lambda: data_mod.collect_dataset(
            c, data_dir, out / "collect_shards", progress=progress), what=f"{c.episodes} episodes")
    except Exception as e:
        raise fail("collect", e) from e
    record("collect", [collect])
    result: dict[str, Any] = {"out": str(out), "stages": groups}
    if until == "collect":
        return result

    # 2 annotate -----------------------------------------------------------------------------------------------
    _stage(2, "annotate", "simulator-privileged teacher, every frame")
    fp_annotate = fingerprint("annotate", fp_collect, data_mod.annotate_fingerprint_parts())
    try:
        annotate = cache.run("annotate", fp_annotate, [data_dir / "rationales.jsonl", data_dir / "annotations.sqlite"],
                             lambda: data_mod.annotate_with_sim_teacher(data_dir, progress=progress))
    except Exception as e:
        raise fail("annotate", e) from e
    record("annotate", [annotate])
    if until == "annotate":
        return result

    # 3 train --------------------------------------------------------------------------------------------------
    t = config.train
    _stage(3, "train", f"{len(models)} models x {t.max_steps} steps, {min(t.parallel, len(models))} at a "
           f"time, 1 thread each: " + ", ".join(m.name for m in models))
    fp_train = {m.name: fingerprint("train", fp_annotate, train_mod.train_fingerprint_parts(t, m)) for m in models}
    by_name = {m.name: m for m in models}
    try:
        trained = cache.run_group(
            {f"train:{m.name}": (fp_train[m.name], [train_dir / m.name]) for m in models},
            lambda names: {f"train:{n}": r for n, r in train_mod.train_models(
                t, [by_name[n.split(":", 1)[1]] for n in names], data_dir, train_dir, progress=progress).items()})
    except Exception as e:
        raise fail("train", e) from e
    record("train", list(trained.values()))
    train_results = {m.name: trained[f"train:{m.name}"].result for m in models}
    if until == "train":
        return result

    # 4 evaluate -----------------------------------------------------------------------------------------------
    e = config.eval
    _stage(4, "evaluate", f"{e.episodes} episode(s) per model through policy_node + sim_bridge_node "
           f"({min(e.lanes, len(models))} lane(s)); references in-process: {', '.join(e.references) or 'none'}")
    items = {f"eval:{m.name}": (fingerprint("eval", fp_train[m.name], eval_mod.eval_fingerprint_parts(m, c, e)),
                                [eval_dir / m.name]) for m in models}
    checkpoints = {m.name: train_results[m.name]["checkpoint"] for m in models}
    base = eval_mod.base_reference(t, e)  # (ModelSettings, checkpoint) of the pretrained base, or None
    if base is not None:
        by_name[base[0].name], checkpoints[base[0].name] = base
        items[f"eval:{base[0].name}"] = (fingerprint("eval", eval_mod.checkpoint_fingerprint(base[1]),
                                                     eval_mod.eval_fingerprint_parts(base[0], c, e)),
                                         [eval_dir / base[0].name])
    if e.references:
        items["eval:references"] = (fingerprint("references", eval_mod.reference_fingerprint_parts(c, e)),
                                    [eval_dir / "references"])

    def evaluate(names: list[str]) -> dict[str, dict[str, Any]]:
        todo = [by_name[n.split(":", 1)[1]] for n in names if n != "eval:references"]
        refs = e.references if "eval:references" in names else None
        got = eval_mod.evaluate_models(todo, {m.name: checkpoints[m.name] for m in todo}, c, e,
                                       eval_dir, progress=progress, references=refs,
                                       reference_dir=eval_dir / "references")
        res = {f"eval:{n}": r for n, r in got["models"].items()}
        if refs:
            res["eval:references"] = got["references"]
        return res

    try:
        evaluated = cache.run_group(items, evaluate)
    except Exception as err:
        raise fail("evaluate", err) from err
    record("eval", list(evaluated.values()))
    eval_results = {"models": {m.name: evaluated[f"eval:{m.name}"].result for m in models},
                    "references": evaluated["eval:references"].result if e.references else {}}
    if base is not None:
        eval_results["base"] = {"checkpoint": str(base[1]), **evaluated[f"eval:{base[0].name}"].result}
    if until == "eval":
        return result

    # 5 analyse ------------------------------------------------------------------------------------------------
    a = config.analysis
    _stage(5, "analyse", f"forced-rationale diagnostic on {a.diagnostic_frames} validation frames, "
           f"{a.example_frames} example frame(s) with rationales and attention, latency over {a.latency_steps} steps "
           "per rationale mode")
    specs = {}
    for m in models:
        tc = train_mod.train_config(t, m, data_dir, train_dir / m.name)
        specs[f"analysis:{m.name}"] = {
            "name": m.name, "checkpoint": train_results[m.name]["checkpoint"], "dataset": str(data_dir),
            "val_fraction": tc.val_fraction, "split_seed": tc.seed, "has_rationale": m.has_rationale,
            "example_frames": a.example_frames, "diagnostic_frames": a.diagnostic_frames,
            "latency_steps": a.latency_steps, "every_n": e.rationale_every_n, "out_dir": str(analysis_dir / m.name)}
    items = {n: (fingerprint("analysis", fp_train[s["name"]], {k: v for k, v in s.items() if k != "checkpoint"},
                             "v2"), [analysis_dir / s["name"]]) for n, s in specs.items()}
    try:
        analysed = cache.run_group(items, lambda names: _analyse([specs[n] for n in names], a.workers, progress))
    except Exception as err:
        raise fail("analyse", err) from err
    record("analysis", list(analysed.values()))
    analyses = {m.name: analysed[f"analysis:{m.name}"].result for m in models}
    if until == "analysis":
        return result

    # 6 report -------------------------------------------------------------------------------------------------
    _stage(6, "report", f"{report_dir / 'index.html'}")
    fp_report = fingerprint("report", [o.fingerprint for o in cache.outcomes], "v3")
    from refinevla_core.bench import machine_info

    def report() -> dict[str, Any]:
        context = {"config": to_dict(config), "dataset": str(data_dir), "collect": collect.result,
                   "annotate": annotate.result, "train": train_results, "eval": eval_results, "analysis": analyses,
                   "stages": groups, "machine": machine_info(),
                   "load_average": [round(v, 2) for v in (*load_start, *os.getloadavg())]}
        return write_report(report_dir, context)

    try:
        reported = cache.run("report", fp_report, [report_dir], report)
    except Exception as err:
        raise fail("report", err) from err
    record("report", [reported])
    elapsed = time.perf_counter() - started
    ran = [g["name"] for g in groups if not g["cached"]]
    print(f"\nrefinevla demo ({config.mode}) finished in {elapsed / 60:.1f} min; stages run: "
          f"{', '.join(ran) or 'none (all cached)'}", flush=True)
    result.update({"report": reported.result["html"], "seconds": elapsed, "ran": ran})
    return result


def _analyse(specs: list[dict[str, Any]], workers: int, progress: bool) -> dict[str, dict[str, Any]]:
    from tqdm import tqdm

    from refinevla_core.demo.analysis import analyze_model

    results = {}
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(specs))), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(analyze_model, s): s["name"] for s in specs}
        with tqdm(total=len(specs), desc="analyse", unit="model", disable=not progress, file=sys.stderr) as bar:
            for future in as_completed(futures):
                results[f"analysis:{futures[future]}"] = future.result()
                bar.update(1)
    return results
