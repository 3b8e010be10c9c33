"""Evaluation reports a reader can trust at a glance: per-task success with Wilson 95 % intervals, a SimplerEnv-style
table, plots, and captioned videos — as JSON (for tools), Markdown (for the repo) and HTML (for a browser).
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.eval.runner import EpisodeResult, TaskSummary, summarise
from refinevla_core.eval.stats import Rate
from refinevla_core.eval.video import captioned_frame, write_video


def run_name(checkpoint: str | Path) -> str:
    """The name a checkpoint goes by in reports: its run folder, since every run's model is called `final`
    (runs/tiny/final -> tiny; runs/tiny/checkpoints/step-00000200 -> tiny@step-00000200)."""
    path = Path(checkpoint).expanduser().resolve()
    if path.name == "final" and path.parent.name:
        return path.parent.name
    if path.name.startswith("step-") and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}@{path.name}"
    return path.name


def simpler_table(rows: dict[str, dict[str, Rate]], tasks: Sequence[str]) -> str:
    """Markdown table in the layout of SimplerEnv papers: one row per policy, one column per task, then the average
    of the per-task rates. Cells: 'success % (k/n)'."""
    head = "| Policy | " + " | ".join(tasks) + " | Average |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for name, rates in rows.items():
        cells, values = [], []
        for t in tasks:
            r = rates.get(t)
            if r is None or not r.trials:
                cells.append("-")
            else:
                cells.append(f"{100 * r.rate:.1f}% ({r.successes}/{r.trials})")
                values.append(r.rate)
        avg = f"{100 * float(np.mean(values)):.1f}%" if values else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def _plot(summary: dict[str, TaskSummary], results: list[EpisodeResult], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    paths = []
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks)), 3.2))
    rates = [100 * summary[t].rate.rate for t in tasks]
    err = np.array([[100 * (summary[t].rate.rate - summary[t].rate.low) for t in tasks],
                    [100 * (summary[t].rate.high - summary[t].rate.rate) for t in tasks]])
    ax.bar(tasks, rates, yerr=err, capsize=6, color="#4C72B0")
    for i, t in enumerate(tasks):
        ax.text(i, 2, f"{summary[t].rate.successes}/{summary[t].rate.trials}", ha="center", color="white")
    ax.set_ylim(0, 105)
    ax.set_ylabel("success % (Wilson 95 %)")
    ax.set_title("success rate per task")
    fig.tight_layout()
    paths.append(out / "success.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks)), 3.2))
    for i, t in enumerate(tasks):
        rs = [r for r in results if r.task == t]
        ok = [r.steps for r in rs if r.success]
        bad = [r.steps for r in rs if not r.success]
        ax.scatter([i - 0.08] * len(ok), ok, color="#55A868", label="success" if i == 0 else None, alpha=0.7)
        ax.scatter([i + 0.08] * len(bad), bad, color="#C44E52", label="failure" if i == 0 else None, alpha=0.7)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("episode length (steps)")
    ax.legend(loc="best")
    fig.tight_layout()
    paths.append(out / "steps.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_videos(results: list[EpisodeResult], out: Path, fps: float = 5.0, size: int = 256) -> dict[str, Path]:
    """One captioned video per episode that recorded frames; key: '<task> seed <seed>'."""
    videos = {}
    for r in results:
        if not r.frames:
            continue
        frames = []
        for t, image in enumerate(r.frames):
            caption = r.captions[t] if t < len(r.captions) else ("success" if r.success else "failure")
            header = f"{r.task} | seed {r.seed} | step {t}/{r.steps} | {'solved' if r.success else 'not solved'}"
            frames.append(captioned_frame(image, header, caption if t < len(r.captions) else
                                          f"episode over: {'solved' if r.success else 'not solved'} "
                                          f"({r.instruction})", size=size))
        path = write_video(out / "videos" / f"{r.task}_seed{r.seed}", frames, fps=fps)
        videos[f"{r.task} seed {r.seed}"] = path
    return videos


def write_report(out: Path, results: list[EpisodeResult], meta: dict[str, Any], policy_name: str = "policy",
                 fps: float = 5.0) -> dict[str, Any]:
    """Write report.json, report.md, report.html, plots and videos under `out`; returns the JSON payload."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    tasks = list(summary)
    plots = _plot(summary, results, out) if results else []
    videos = write_videos(results, out, fps=fps)
    payload = {
        "meta": {**meta, "policy": policy_name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "summary": {t: s.to_dict() for t, s in summary.items()},
        "episodes": [r.to_dict() for r in results],
        "plots": [p.name for p in plots],
        "videos": {k: str(v.relative_to(out)) for k, v in videos.items()},
    }
    (out / "report.json").write_text(json.dumps(payload, indent=1) + "\n")
    per_task = ["| task | success (Wilson 95 %) | solved at last step | mean steps | policy ms/step |",
                "|---|---|---|---|---|"]
    for t, s in summary.items():
        ms = f"{s.mean_policy_ms:.1f}" if s.mean_policy_ms is not None else "-"
        per_task.append(f"| {t} | {s.rate.text()} | {100 * s.final_rate.rate:.1f}% | {s.mean_steps:.1f} | {ms} |")
    table = simpler_table({policy_name: {t: s.rate for t, s in summary.items()}}, tasks)
    conf = ", ".join(f"{k}={v}" for k, v in meta.items())
    md = [f"# Evaluation: {policy_name}", "", f"{conf}", "", "## Success per task", "", *per_task, "",
          "## SimplerEnv-style table", "", table, "",
          "Success = task solved at any step; Wilson score interval at 95 %.", ""]
    md += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if videos:
        md += ["## Videos (rationale as caption)", ""] + [f"- [{k}]({v.relative_to(out)})" for k, v in videos.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    rows = "".join(f"<tr><td>{html.escape(t)}</td><td>{html.escape(s.rate.text())}</td>"
                   f"<td>{100 * s.final_rate.rate:.1f}%</td><td>{s.mean_steps:.1f}</td></tr>"
                   for t, s in summary.items())
    vids = "".join(
        f"<figure><figcaption>{html.escape(k)}</figcaption>"
        + (f"<video src='{v.relative_to(out)}' controls loop width='256'></video>" if v.suffix == ".mp4"
           else f"<img src='{v.relative_to(out)}' width='256'>") + "</figure>"
        for k, v in videos.items())
    page = (f"<!doctype html><meta charset='utf-8'><title>refinevla eval: {html.escape(policy_name)}</title>"
            f"<h1>Evaluation: {html.escape(policy_name)}</h1><p>{html.escape(conf)}</p>"
            "<table border='1' cellpadding='4'><tr><th>task</th><th>success (Wilson 95 %)</th>"
            f"<th>solved at last step</th><th>mean steps</th></tr>{rows}</table>"
            + "".join(f"<p><img src='{p.name}'></p>" for p in plots) + f"<div>{vids}</div>")
    (out / "report.html").write_text(page + "\n")
    return payload
