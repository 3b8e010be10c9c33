"""The demo's report: one HTML page (+ PNGs, report.json, report.md) that says what was measured and nothing more.

Sections: run and stages, data, loss curves per term, closed-loop success with Wilson 95 % intervals (models through
the ROS nodes; the scripted expert and a random policy as references), the forced-rationale diagnostic, generated vs
teacher rationales on the same frames, attention overlays, latency per rationale mode, and the limits of the run.
Claims are generated from the numbers: overlapping intervals are called overlapping, and quick mode says it makes no
success-rate claim.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from refinevla_core.data.episode_dataset import EpisodeDataset

SECTIONS = ("run", "data", "training", "success", "diagnostic", "rationales", "attention", "latency", "limits")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(_fmt(c).replace("|", "/").replace("\n", " ") for c in row) + " |" for row in rows]


# ---- figures -----------------------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(train: dict[str, dict[str, Any]], path: Path) -> Path:
    """Two panels: the action term and the rationale term per model (train lines, validation markers)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (name, info) in enumerate(train.items()):
        color = palette[index % len(palette)]  # one colour per model in both panels
        metrics = json.loads(Path(info["metrics"]).read_text())
        for ax, key, val_key in ((axes[0], "loss_action", "val_loss_action"),
                                 (axes[1], "loss_rationale", "val_loss_rationale")):
            pts = [(r["step"], r.get(key)) for r in metrics.get("train", []) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), color=color, label=f"{name} (train)")
                val = [(r["step"], r.get(val_key)) for r in metrics.get("val", []) if r.get(val_key) is not None]
                if val:
                    ax.plot(*zip(*val, strict=True), marker="o", linestyle="--", color=color, label=f"{name} (val)")
    axes[0].set_title("L_action (action tokens)")
    axes[1].set_title("L_rationale (rationale tokens; λ_r = 0 has none)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_success(rows: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(rows)), 3.6), dpi=100)
    names = [n for n, _ in rows]
    rates = [100 * r["success_rate"] for _, r in rows]
    err = np.array([[100 * (r["success_rate"] - r["wilson95"][0]) for _, r in rows],
                    [100 * (r["wilson95"][1] - r["success_rate"]) for _, r in rows]])
    colors = ["#4C72B0" if "via" in r and r["via"].startswith("ROS") else "#999999" for _, r in rows]
    ax.bar(names, rates, yerr=err, capsize=6, color=colors)
    for i, (_, r) in enumerate(rows):
        ax.text(i, 100 * r["wilson95"][1] + 2, f"{r['successes']}/{r['trials']}", ha="center", fontsize=9)
    ax.set_ylim(0, 112)
    ax.set_ylabel("success % (Wilson 95 %)")
    ax.set_title("closed-loop success\n(blue: models through the ROS nodes; grey: in-process references)", fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


ATTENTION_CMAP = "jet"  # AttentionMap.overlay's default


def plot_attention_grid(frames: list[np.ndarray], overlays: dict[str, list[Path]], path: Path) -> Path:
    plt = _plt()
    cols = 1 + len(overlays)
    fig, axes = plt.subplots(len(frames), cols, figsize=(2.4 * cols, 2.5 * len(frames)), dpi=100, squeeze=False)
    for r, frame in enumerate(frames):
        axes[r][0].imshow(frame)
        axes[r][0].set_title(f"example {r}", fontsize=9)
        for c, (name, pngs) in enumerate(overlays.items(), start=1):
            with Image.open(pngs[r]) as img:
                axes[r][c].imshow(np.asarray(img.convert("RGB")))
            axes[r][c].set_title(name, fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    bar = fig.add_axes((0.92, 0.15, 0.02, 0.7))  # the overlays' colour scale (refinevla_core.attention)
    fig.colorbar(plt.cm.ScalarMappable(cmap=ATTENTION_CMAP), cax=bar,
                 label="action-token attention (per frame, 0 = least, 1 = most)")
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- claims ------------------------------------------------------------------------------------------------------
def success_claims(models: dict[str, dict[str, Any]], references: dict[str, dict[str, Any]], claims: bool,
                   base: dict[str, Any] | None = None) -> list[str]:
    """Sentences the numbers support, and no others."""
    if not claims:
        n = max((m["trials"] for m in models.values()), default=0)
        return [f"Quick mode checks the mechanics only: {n} closed-loop episode(s) per model after a few dozen "
                "training steps cannot support any success-rate claim, and this report makes none."]
    out = []
    names = list(models)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = models[a], models[b]
            if ra["wilson95"][0] > rb["wilson95"][1] or rb["wilson95"][0] > ra["wilson95"][1]:
                hi, lo = (a, b) if ra["success_rate"] > rb["success_rate"] else (b, a)
                out.append(f"{hi} succeeded more often than {lo} ({models[hi]['text']} vs {models[lo]['text']}): "
                           "the 95 % intervals do not overlap.")
            else:
                out.append(f"{a} vs {b}: {ra['text']} vs {rb['text']} — the 95 % intervals overlap, so this "
                           "evaluation does not show a difference between them.")
    for name, r in models.items() if base else ():
        lo, hi = r["wilson95"]
        verdict = ("fine-tuning raised success: the intervals do not overlap" if lo > base["wilson95"][1] else
                   "fine-tuning lowered success: the intervals do not overlap" if hi < base["wilson95"][0] else
                   "the intervals overlap: no difference shown")
        out.append(f"{name} vs the pretrained base alone: {r['text']} vs {base['text']} - {verdict}.")
    expert = references.get("expert")
    if expert:
        out.append(f"The scripted expert (reads the simulator state) solves {expert['text']} of the same scenes: "
                   "the task is solvable at this camera and step limit.")
    rnd = references.get("random")
    if rnd:
        out.append(f"Random actions solve {rnd['text']}: the floor a learned policy has to beat.")
    return out


def diagnostic_claims(analyses: dict[str, dict[str, Any]], claims: bool) -> list[str]:
    """The measured order of the three action errors per rationale-first model (ties called ties)."""
    out = []
    for name, a in analyses.items():
        d = a["diagnostic"]
        if "teacher" not in d or "generated" not in d:
            continue
        values = {"the teacher's rationale fed in": d["teacher"]["l1_xyz"],
                  "its own generated rationale": d["generated"]["l1_xyz"],
                  "no rationale": d["action_only"]["l1_xyz"]}
        ranked = sorted(values.items(), key=lambda kv: kv[1])
        words = [f"{k} ({v:.4f})" for k, v in ranked]
        relations = ["=" if abs(ranked[i + 1][1] - ranked[i][1]) < 5e-4 else "<" for i in range(2)]
        text = (f"{name}: translation L1 on {d['frames']} validation frames: {words[0]} {relations[0]} {words[1]} "
                f"{relations[1]} {words[2]}; predicting the mean action gives {d['mean_action']['l1_xyz']:.4f}.")
        if not claims:
            text += " (Quick mode: a model trained for a few dozen steps; this only shows the diagnostic runs.)"
        out.append(text)
    same = [name for name, a in analyses.items() if a["diagnostic"].get("distinct_actions") == 1
            and a["diagnostic"]["frames"] > 1]
    if same:
        out.append(f"{', '.join(same)}: the same action for every one of the validation frames (no rationale in "
                   "context): the image does not change what it does.")
    if claims:
        for name, a in analyses.items():
            d = a["diagnostic"]
            plain, mean = d["action_only"]["l1_xyz"], d["mean_action"]["l1_xyz"]
            if plain > mean:
                out.append(f"{name}: its actions (no rationale) are further from the expert's than always predicting "
                           f"the mean action ({plain:.4f} vs {mean:.4f} translation L1): at this budget it has not "
                           "learned to act from the image.")
    return out


# ---- the report --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """A header and its rows, rendered alike in the HTML page and in report.md."""

    head: list[str]
    rows: list[list[Any]]

    def html(self) -> str:
        return _table(self.head, self.rows)

    def markdown(self) -> list[str]:
        return _md_table(self.head, self.rows)


@dataclass(frozen=True)
class RunResults:
    """The stages' results as run_demo hands them over (`context`), unpacked once for every part of the report."""

    context: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        return self.context["config"]

    @property
    def model_settings(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.config["train"]["models"]}

    @property
    def claims(self) -> bool:
        return bool(self.config["claims"])

    @property
    def train(self) -> dict[str, dict[str, Any]]:
        return self.context["train"]

    @property
    def evals(self) -> dict[str, dict[str, Any]]:
        return self.context["eval"]["models"]

    @property
    def references(self) -> dict[str, dict[str, Any]]:
        return self.context["eval"].get("references") or {}

    @property
    def base(self) -> dict[str, Any] | None:
        """The pretrained base evaluated through the same lanes, when the run has one."""
        return self.context["eval"].get("base")

    @property
    def analyses(self) -> dict[str, dict[str, Any]]:
        return self.context["analysis"]

    @property
    def first_analysis(self) -> dict[str, Any]:
        """Every model was analysed on the same example frames: the first model's entry names them."""
        return next(iter(self.analyses.values()))

    @property
    def max_rationale_tokens(self) -> int:
        return int(self.config["train"]["max_rationale_tokens"])

    def success_rows(self) -> list[tuple[str, dict[str, Any]]]:
        """The models in config order, then the pretrained base and the in-process references."""
        base = self.base
        return [(n, self.evals[n]) for n in self.model_settings if n in self.evals] + (
            [("pretrained base alone (reference)", base)] if base else []) + [
            (f"{k} (reference)", v) for k, v in self.references.items()]


@dataclass(frozen=True)
class StageTiming:
    """Wall and CPU time of the stages before the report, against the budget and the cores of the machine."""

    total_seconds: float
    total_cpu_seconds: float
    cores: int
    budget_s: float

    @classmethod
    def of(cls, run: RunResults) -> StageTiming:
        stages, machine = run.context["stages"], run.context["machine"]
        return cls(total_seconds=sum(s["seconds"] for s in stages),
                   total_cpu_seconds=sum(s.get("cpu_seconds", 0.0) for s in stages),
                   cores=int(machine.get("cpu_affinity") or machine.get("cpu_count") or 1),
                   budget_s=float(run.config["time_budget_s"]))

    def text(self, load: list[float] | None, machine: dict[str, Any]) -> str:
        total_s, total_cpu = self.total_seconds, self.total_cpu_seconds
        return (f"Wall time of the stages before this report: {total_s / 60:.1f} min (budget "
                f"{self.budget_s / 60:.0f} min); CPU time of all its processes: {total_cpu / 60:.1f} core-min, i.e. "
                f"at least {total_cpu / self.cores / 60:.1f} min on {self.cores} idle cores. Load average "
                f"(1/5/15 min) at start {load[:3] if load else '?'} and end {load[3:] if load else '?'} (other work "
                f"on the machine stretches the wall time); {machine.get('cpu')}, {machine.get('cpu_count')} CPUs.")


@dataclass(frozen=True)
class ReportContent:
    """Everything the report says, computed once and written three ways (HTML, Markdown, JSON)."""

    timing: StageTiming
    timing_text: str
    stages: Table
    training: Table
    success: Table
    diagnostic: Table
    rationale_stats: Table
    latency: Table
    loop_rationales: Table
    success_text: list[str]
    diagnostic_text: list[str]
    limits: list[str]

    @classmethod
    def of(cls, run: RunResults) -> ReportContent:
        timing = StageTiming.of(run)
        return cls(timing=timing, timing_text=timing.text(run.context.get("load_average"), run.context["machine"]),
                   stages=stage_table(run.context["stages"]), training=training_table(run),
                   success=success_table(run.success_rows()), diagnostic=diagnostic_table(run.analyses),
                   rationale_stats=rationale_stats_table(run), latency=latency_table(run),
                   loop_rationales=loop_rationales_table(run.evals),
                   success_text=success_claims(run.evals, run.references, run.claims, run.base),
                   diagnostic_text=diagnostic_claims(run.analyses, run.claims), limits=limits_of_run(run))


def write_report(out: Path, context: dict[str, Any]) -> dict[str, Any]:
    """Write <out>/index.html, report.json, report.md and the PNGs from the stages' results (`context`)."""
    out.mkdir(parents=True, exist_ok=True)
    run = RunResults(context)
    pngs = write_figures(out, run)
    content = ReportContent.of(run)
    payload = report_payload(run, content)
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out / "index.html").write_text(html_page(run, content))
    (out / "report.md").write_text(markdown_page(run, content, payload["time"]))
    return {"html": str(out / "index.html"), "json": str(out / "report.json"), "md": str(out / "report.md"),
            "pngs": [str(p) for p in pngs]}


# ---- figures of a run --------------------------------------------------------------------------------------------
def write_figures(out: Path, run: RunResults) -> tuple[Path, Path, Path]:
    """The three figures of the page, plus the example frames, attention overlays and per-model loss curves they
    link to; returns (losses, success, attention) PNGs."""
    losses_png = plot_losses(run.train, out / "losses.png")
    success_png = plot_success(run.success_rows(), out / "success.png")
    frames = save_example_frames(out, run.context["dataset"], run.first_analysis["examples"])
    attention_png = plot_attention_grid(frames, copy_attention_overlays(out, run.analyses), out / "attention.png")
    copy_loss_curves(out, run.train)
    return losses_png, success_png, attention_png


def save_example_frames(out: Path, dataset: str | Path, examples: list[dict[str, Any]]) -> list[np.ndarray]:
    """The example frames (the same validation frames for every model), saved 3x enlarged as example_<k>.png."""
    ds = EpisodeDataset(dataset)
    frames = []
    for k, ex in enumerate(examples):
        image = ds.load_episode(ex["episode"]).images[ex["frame"]]
        frames.append(image)
        Image.fromarray(image).resize((image.shape[1] * 3, image.shape[0] * 3), Image.NEAREST).save(
            out / f"example_{k}.png")
    return frames


def copy_attention_overlays(out: Path, analyses: dict[str, dict[str, Any]]) -> dict[str, list[Path]]:
    """Each model's attention overlay per example frame, copied to attention/<model>_<k>.png."""
    overlays: dict[str, list[Path]] = {}
    for name, a in analyses.items():
        overlays[name] = []
        for k, ex in enumerate(a["examples"]):
            target = out / "attention" / f"{name}_{k}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ex["attention_png"], target)
            overlays[name].append(target)
    return overlays


def copy_loss_curves(out: Path, train: dict[str, dict[str, Any]]) -> None:
    """The trainer's own loss curve per model (the page links them), where the trainer drew one."""
    for name, info in train.items():
        if Path(info["loss_curve"]).is_file():
            shutil.copyfile(info["loss_curve"], out / f"loss_curve_{name}.png")


# ---- tables ------------------------------------------------------------------------------------------------------
def stage_table(stages: list[dict[str, Any]]) -> Table:
    return Table(["stage", "wall seconds", "CPU seconds (all processes)", "this run"],
                 [[s["name"], round(s["seconds"], 1), round(s.get("cpu_seconds", 0.0), 1),
                   "cached (skipped)" if s["cached"] else "ran"] for s in stages])


def training_table(run: RunResults) -> Table:
    """Per model: its loss settings, the last training losses and the validation errors the trainer measured."""
    settings, rows = run.model_settings, []
    for name, info in run.train.items():
        last, val = info["last_train"], info["last_val"]
        rows.append([name, settings[name]["lambda_rationale"], info["target_order"],
                     settings[name]["rationale_dropout"], info["steps"], round(info["train_seconds"] or 0, 1),
                     last.get("loss_action"), last.get("loss_rationale"), val.get("action_l1_xyz"),
                     val.get("action_l1_xyz_mean_action"), val.get("action_l1_xyz_teacher_forced"),
                     val.get("rationale_token_accuracy") if _trains_rationale(settings[name]) else None])
    head = ["model", "λ_r", "target order", "rationale dropout", "steps", "train s", "last L_action",
            "last L_rationale", "val xyz L1 (as the policy decodes, no rationale)", "val xyz L1 of the mean "
            "action", "val xyz L1 (teacher-forced)", "val rationale token acc"]
    return Table(head, rows)


def success_table(success_rows: list[tuple[str, dict[str, Any]]]) -> Table:
    return Table(["policy", "how it ran", "success (Wilson 95 %)", "solved at last step", "mean steps"],
                 [[n, _how_it_ran(r), r["text"], r.get("final_successes", "–"), r["mean_steps"]]
                  for n, r in success_rows])


def _how_it_ran(result: dict[str, Any]) -> str:
    return (result["via"] + (f", rationale mode {result['rationale_mode']}" if "rationale_mode" in result else "")
            + (f"; in {result['isolation']}" if result.get("isolation") else ""))


def diagnostic_table(analyses: dict[str, dict[str, Any]]) -> Table:
    """Action L1 without a rationale, after the model's own, with the teacher's fed in, and of the mean action."""
    head = ["model", "order", "frames", "L1 no rationale", "L1 own rationale", "L1 teacher's rationale fed",
            "L1 mean action", "xyz: no / own / teacher / mean"]
    return Table(head, [_diagnostic_row(name, a) for name, a in analyses.items()])


def _diagnostic_row(name: str, analysis: dict[str, Any]) -> list[Any]:
    d = analysis["diagnostic"]

    def l1(key: str, field: str = "l1") -> Any:
        return d[key][field] if key in d else None

    own = l1("generated") if analysis["target_order"] == "rationale_then_action" else (
        "= no rationale (action comes first)" if "generated" in d else None)
    teacher = l1("teacher") if "teacher" in d else (
        "n/a (action comes first)" if analysis["has_rationale"] else "n/a (no rationale trained)")
    xyz = " / ".join(_fmt(l1(k, "l1_xyz"), 4) for k in ("action_only", "generated", "teacher", "mean_action"))
    return [name, analysis["target_order"], d["frames"], l1("action_only"), own, teacher, l1("mean_action"), xyz]


def rationale_stats_table(run: RunResults) -> Table:
    """How the generated rationales compare with the teacher's, per model that generates one."""
    rows = []
    for name, a in run.analyses.items():
        r = a["diagnostic"].get("rationales")
        if r:
            rows.append([name, r["frames"], r.get("parse_rate"),
                         (run.evals.get(name) or {}).get("rationale_parse_rate"), r["distinct_generated"],
                         r["most_common_share"], r["phase_agreement"], r.get("phase_base_rate"),
                         r["exact_match_teacher_target"]])
    head = ["model", "frames", "parse into four sections", "parse rate, closed loop (policy_node)",
            "distinct generated", "share of the most common",
            "phase agrees with teacher",
            "agreement of always the commonest phase", "exact match of the trained text"]
    return Table(head, rows)


def latency_table(run: RunResults) -> Table:
    """In-process latency per rationale mode, then policy_node's measured in the closed loop."""
    rows = []
    for name, a in run.analyses.items():
        for r in a["latency"]:
            rows.append([name, "Policy in-process", r["mode"], r["steps"], r["mean_ms"], r["median_ms"],
                         r["p90_ms"], r["ratio_vs_action_only"]])
    for name, e in run.evals.items():
        lat = e["policy_node_latency_ms"]
        if lat:
            rows.append([name, "policy_node, closed loop", f"{e['rationale_mode']} (all steps)", lat["n"],
                         lat["mean"], lat["p50"], lat["p90"], None])
        if e.get("fresh_rationale_step_ms"):
            f = e["fresh_rationale_step_ms"]
            rows.append([name, "policy_node, closed loop", "steps with a fresh rationale", f["n"], f["mean"],
                         f["p50"], f["p90"], None])
    return Table(["model", "where", "mode", "steps", "mean ms", "median ms", "p90 ms", "× action-only"], rows)


def loop_rationales_table(evals: dict[str, dict[str, Any]]) -> Table:
    """Up to two rationales per model that policy_node published during the closed-loop episodes."""
    return Table(["model", "seed", "step", "rationale"],
                 [[name, x["seed"], x["step"], x["text"]] for name, e in evals.items()
                  for x in e.get("rationale_examples", [])[:2]])


def limits_of_run(run: RunResults) -> list[str]:
    """What this run does not show, with its own model size, step count and rationale length."""
    config = run.config
    return [
        f"Models: the tiny preset (~{run.first_analysis['parameters'] / 1e6:.1f} M parameters). Stage 1 "
        "(models/tiny-base, built by models/build_tiny_base.sh) pretrained it action-only on the project's own "
        "multi-task ManiSkill3 demonstrations; the demo's models are its stage-2 fine-tunes with selective transfer "
        f"for {config['train']['max_steps']} optimizer steps each on 2 CPU cores. The paper fine-tunes a 3B VLA: "
        "nothing here measures the paper's claims at its scale.",
        f"Rationales: the simulator teacher's four short sections (up to {run.max_rationale_tokens} tokens; longer "
        "ones are shortened per section, never dropped). The 'as trained' text in the rationale section shows "
        "exactly what the models saw.",
        "Closed-loop numbers come from one seed range; with 20-30 episodes per model a 95 % interval spans "
        "about ±20 points, so only large differences can show.",
        "Timings were taken on a shared machine; the load average is recorded with the run.",
    ]


# ---- the three pages ---------------------------------------------------------------------------------------------
def report_payload(run: RunResults, content: ReportContent) -> dict[str, Any]:
    """report.json: the numbers behind every table and sentence, with the run's config and machine."""
    config, context, evals, analyses = run.config, run.context, run.evals, run.analyses
    return {
        "mode": config["mode"], "claims": run.claims, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": context["machine"], "load_average": context.get("load_average"),
        "total_seconds": content.timing.total_seconds, "total_cpu_seconds": content.timing.total_cpu_seconds,
        "time_budget_s": content.timing.budget_s, "stages": context["stages"],
        "data": context["collect"], "annotation": context["annotate"], "train": run.train,
        "success": {n: {k: v for k, v in r.items() if k != "episodes"} for n, r in run.success_rows()},
        "models": {n: {"successes": e["successes"], "trials": e["trials"], "wilson95": e["wilson95"]}
                   for n, e in evals.items()},
        "references": {n: {"successes": r["successes"], "trials": r["trials"], "wilson95": r["wilson95"]}
                       for n, r in run.references.items()},
        "diagnostic": {n: a["diagnostic"] for n, a in analyses.items()},
        "examples": {n: a["examples"] for n, a in analyses.items()},
        "latency": content.latency.rows, "claims_text": content.success_text + content.diagnostic_text,
        "limits": content.limits, "config": config, "sections": list(SECTIONS),
    }


PAGE_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em} table{border-collapse:collapse;"
              "margin:0.5em 0} td,th{border:1px solid #bbb;padding:3px 6px;font-size:13px;vertical-align:top} "
              "td.r{max-width:650px;font-family:monospace;font-size:12px} .claim{background:#f4f4f4;padding:0.6em}")

DIAGNOSTIC_HOW_TO_READ = (
    "Action L1 (all 7 dimensions; then "
    "translation only) of greedy decoding on held-out frames: without a rationale, after the model's own "
    "generated rationale, and with the teacher's rationale (as trained) fed in its place. How to read it: an "
    "error lower with the teacher's rationale than with the model's own means the action head uses the "
    "rationale but the generated rationale is not grounded in the image; no difference means the action "
    "ignores the rationale. For the rationale-first model, (a) is the mode it was trained in on only the "
    "samples whose rationale was dropped (the rationale dropout). The trainer's validation action L1 in the "
    "training table is close to (c) for the "
    "rationale-first model, but it also feeds the true previous action tokens; here all 7 action tokens are "
    "decoded greedily, as in the closed loop.")

NO_DIAGNOSTIC = ["No model of this run writes its rationale before the action, so there is no rationale to force."]


def _paragraphs(lines: list[str]) -> str:
    return "".join(f"<p>{html.escape(t)}</p>" for t in lines)


def html_page(run: RunResults, content: ReportContent) -> str:
    """index.html: one section per entry of SECTIONS, in that order."""
    mode = html.escape(run.config["mode"])
    claims = f"<div class='claim'>{_paragraphs(content.success_text)}</div>"
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>refinevla demo ({mode})</title>",
        f"<style>{PAGE_STYLE}</style><h1>refinevla demo — {mode} run</h1>",
        "<section id='run'><h2>Run</h2><p>collect → annotate → train → closed-loop evaluation through the ROS nodes "
        f"→ this report. {html.escape(content.timing_text)}</p>",
        f"{claims}{content.stages.html()}</section>",
        f"<section id='data'><h2>Data</h2>{_data_table(run).html()}</section>",
        *_html_training(run, content),
        "<section id='success'><h2>Closed-loop success</h2><img src='success.png' alt='success'>",
        content.success.html(), f"{claims}</section>",
        f"<section id='diagnostic'><h2>Forced-rationale diagnostic</h2><p>{DIAGNOSTIC_HOW_TO_READ}</p>",
        content.diagnostic.html(),
        f"<div class='claim'>{_paragraphs(content.diagnostic_text or NO_DIAGNOSTIC)}</div></section>",
        *_html_rationales(run, content),
        "<section id='attention'><h2>Attention of the action tokens over the image patches</h2>",
        "<img src='attention.png' alt='attention overlays'><p>Mean attention of the 7 action-token positions over "
        "the image patches (last language-model layer, heads averaged; red = more).</p></section>",
        f"<section id='latency'><h2>Latency per rationale mode</h2>{content.latency.html()}</section>",
        f"<section id='limits'><h2>What this run does not show</h2>{_paragraphs(content.limits)}</section>",
    ]
    return "\n".join(parts) + "\n"


def _data_table(run: RunResults) -> Table:
    collect, annotate = run.context["collect"], run.context["annotate"]
    return Table(["episodes", "frames", "expert successes while collecting", "seeds",
                  "frames with a teacher rationale", "teacher"],
                 [[collect["episodes"], collect["frames"], collect["expert_successes"], str(collect["seeds"]),
                   annotate["frames_with_rationale"], annotate["teacher"]]])


def _html_training(run: RunResults, content: ReportContent) -> list[str]:
    curve_links = " ".join(f"<a href='loss_curve_{n}.png'>{html.escape(n)}</a>" for n in run.train)
    return ["<section id='training'><h2>Training: loss curves per term</h2><img src='losses.png' alt='loss curves'>",
            content.training.html(),
            f"<p>Per-model curves: {curve_links}. Teacher-forced validation feeds the true previous tokens (and, for "
            "rationale-first models, the teacher's rationale).</p></section>"]


def _html_rationales(run: RunResults, content: ReportContent) -> list[str]:
    loop = (content.loop_rationales.html() if content.loop_rationales.rows
            else "<p>policy_node published no rationale text in these episodes.</p>")
    examples = [_html_example(run, k) for k in range(len(run.first_analysis["examples"]))]
    return ["<section id='rationales'><h2>Generated rationales next to the teacher's</h2>",
            content.rationale_stats.html(), *examples,
            "<h3>Rationales policy_node published during the closed-loop episodes</h3>", loop, "</section>"]


def _html_example(run: RunResults, k: int) -> str:
    """Example frame k: the teacher's rationale (full and as trained) and each model's rationale and action."""
    ex0 = run.first_analysis["examples"][k]
    parts = [f"<h3>example {k}: episode {ex0['episode']}, frame {ex0['frame']}</h3>",
             f"<img src='example_{k}.png' alt='frame'><p><b>instruction:</b> {html.escape(ex0['instruction'])}</p>",
             "<table><tr><th>source</th><th>rationale</th><th>action (dx, dy, dz m … gripper)</th></tr>",
             f"<tr><td>teacher (simulator state), full</td><td class='r'>{html.escape(ex0['teacher_rationale'])}"
             f"</td><td>{html.escape(_vec(ex0['label_action']))}</td></tr>",
             f"<tr><td>teacher, as trained (≤ {run.max_rationale_tokens} tokens)</td><td class='r'>"
             f"{html.escape(ex0['teacher_target'])}</td><td></td></tr>"]
    for name, a in run.analyses.items():
        ex = a["examples"][k]
        text = ex["generated_rationale"] if a["has_rationale"] else "(no rationale: λ_r = 0)"
        parts.append(f"<tr><td>{html.escape(name)}</td><td class='r'>{html.escape(text or '(empty)')}</td>"
                     f"<td>{html.escape(_vec(ex['action']))}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def markdown_page(run: RunResults, content: ReportContent, when: str) -> str:
    """report.md: the same tables and sentences as the page, for a terminal or a pull request."""
    md = [f"# refinevla demo — {run.config['mode']} run", "", f"Run {when}. {content.timing_text}", "",
          *content.success_text, "", "## Stages", "", *content.stages.markdown(), "", "## Training", "",
          *content.training.markdown(), "", "## Closed-loop success", "",
          *content.success.markdown(),
          "", "## Forced-rationale diagnostic", "", *content.diagnostic.markdown(), "", *content.diagnostic_text, "",
          "## Rationales", "", *content.rationale_stats.markdown(), "",
          "## Latency", "", *content.latency.markdown(), "", "## Limits", "",
          *[f"- {t}" for t in content.limits], "", "## Machine", "",
          *[f"- {k}: {v}" for k, v in run.context["machine"].items()], ""]
    return "\n".join(md)


def _trains_rationale(model: dict[str, Any]) -> bool:
    return model["lambda_rationale"] > 0 and model["rationale_dropout"] < 1.0


def _vec(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:+.3f}" for x in v) + "]"
