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
from pathlib import Path
from typing import Any

import numpy as np

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
    from PIL import Image

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
def write_report(out: Path, context: dict[str, Any]) -> dict[str, Any]:
    """Write <out>/index.html, report.json, report.md and the PNGs from the stages' results (`context`)."""
    out.mkdir(parents=True, exist_ok=True)
    config = context["config"]
    models_cfg = {m["name"]: m for m in config["train"]["models"]}
    train, evals = context["train"], context["eval"]["models"]
    references = context["eval"].get("references") or {}
    analyses = context["analysis"]
    claims = bool(config["claims"])

    losses_png = plot_losses(train, out / "losses.png")
    base = context["eval"].get("base")
    success_rows = [(n, evals[n]) for n in models_cfg if n in evals] + (
        [("pretrained base alone (reference)", base)] if base else []) + [
        (f"{k} (reference)", v) for k, v in references.items()]
    success_png = plot_success(success_rows, out / "success.png")

    # example frames (the same validation frames for every model) and attention overlays
    ds = EpisodeDataset(context["dataset"])
    first = next(iter(analyses.values()))
    frames = []
    for k, ex in enumerate(first["examples"]):
        image = ds.load_episode(ex["episode"]).images[ex["frame"]]
        frames.append(image)
        from PIL import Image

        Image.fromarray(image).resize((image.shape[1] * 3, image.shape[0] * 3), Image.NEAREST).save(
            out / f"example_{k}.png")
    overlays: dict[str, list[Path]] = {}
    for name, a in analyses.items():
        overlays[name] = []
        for k, ex in enumerate(a["examples"]):
            target = out / "attention" / f"{name}_{k}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ex["attention_png"], target)
            overlays[name].append(target)
    attention_png = plot_attention_grid(frames, overlays, out / "attention.png")

    for name, info in train.items():
        if Path(info["loss_curve"]).is_file():
            shutil.copyfile(info["loss_curve"], out / f"loss_curve_{name}.png")

    stage_rows = [[s["name"], round(s["seconds"], 1), round(s.get("cpu_seconds", 0.0), 1),
                   "cached (skipped)" if s["cached"] else "ran"] for s in context["stages"]]
    total_s = sum(s["seconds"] for s in context["stages"])
    total_cpu = sum(s.get("cpu_seconds", 0.0) for s in context["stages"])
    cores = int(context["machine"].get("cpu_affinity") or context["machine"].get("cpu_count") or 1)
    budget = float(config["time_budget_s"])

    # ---- tables --------------------------------------------------------------------------------------------
    train_rows = []
    for name, info in train.items():
        last, val = info["last_train"], info["last_val"]
        train_rows.append([name, models_cfg[name]["lambda_rationale"], info["target_order"],
                           models_cfg[name]["rationale_dropout"], info["steps"], round(info["train_seconds"] or 0, 1),
                           last.get("loss_action"), last.get("loss_rationale"), val.get("action_l1_xyz"),
                           val.get("action_l1_xyz_mean_action"), val.get("action_l1_xyz_teacher_forced"),
                           val.get("rationale_token_accuracy") if _trains_rationale(models_cfg[name]) else None])
    train_head = ["model", "λ_r", "target order", "rationale dropout", "steps", "train s", "last L_action",
                  "last L_rationale", "val xyz L1 (as the policy decodes, no rationale)", "val xyz L1 of the mean "
                  "action", "val xyz L1 (teacher-forced)", "val rationale token acc"]
    success_head = ["policy", "how it ran", "success (Wilson 95 %)", "solved at last step", "mean steps"]
    success_table = [[n, r["via"] + (f", rationale mode {r['rationale_mode']}" if "rationale_mode" in r else "")
                      + (f"; in {r['isolation']}" if r.get("isolation") else ""),
                      r["text"], r.get("final_successes", "–"), r["mean_steps"]] for n, r in success_rows]
    diag_head = ["model", "order", "frames", "L1 no rationale", "L1 own rationale", "L1 teacher's rationale fed",
                 "L1 mean action", "xyz: no / own / teacher / mean"]
    diag_rows = []
    for name, a in analyses.items():
        d = a["diagnostic"]

        def l1(key: str, field: str = "l1", d: dict[str, Any] = d) -> Any:
            return d[key][field] if key in d else None

        own = l1("generated") if a["target_order"] == "rationale_then_action" else (
            "= no rationale (action comes first)" if "generated" in d else None)
        teacher = l1("teacher") if "teacher" in d else (
            "n/a (action comes first)" if a["has_rationale"] else "n/a (no rationale trained)")
        xyz = " / ".join(_fmt(l1(k, "l1_xyz"), 4) for k in ("action_only", "generated", "teacher", "mean_action"))
        diag_rows.append([name, a["target_order"], d["frames"], l1("action_only"), own, teacher, l1("mean_action"),
                          xyz])
    latency_head = ["model", "where", "mode", "steps", "mean ms", "median ms", "p90 ms", "× action-only"]
    latency_rows = []
    for name, a in analyses.items():
        for r in a["latency"]:
            latency_rows.append([name, "Policy in-process", r["mode"], r["steps"], r["mean_ms"], r["median_ms"],
                                 r["p90_ms"], r["ratio_vs_action_only"]])
    for name, e in evals.items():
        lat = e["policy_node_latency_ms"]
        if lat:
            latency_rows.append([name, "policy_node, closed loop", f"{e['rationale_mode']} (all steps)", lat["n"],
                                 lat["mean"], lat["p50"], lat["p90"], None])
        if e.get("fresh_rationale_step_ms"):
            f = e["fresh_rationale_step_ms"]
            latency_rows.append([name, "policy_node, closed loop", "steps with a fresh rationale", f["n"], f["mean"],
                                 f["p50"], f["p90"], None])

    success_text = success_claims(evals, references, claims, base)
    diag_text = diagnostic_claims(analyses, claims)
    rationale_stats = []
    for name, a in analyses.items():
        r = a["diagnostic"].get("rationales")
        if r:
            rationale_stats.append([name, r["frames"], r.get("parse_rate"),
                                    (evals.get(name) or {}).get("rationale_parse_rate"), r["distinct_generated"],
                                    r["most_common_share"], r["phase_agreement"], r.get("phase_base_rate"),
                                    r["exact_match_teacher_target"]])
    mrt = int(config["train"]["max_rationale_tokens"])
    limits = [
        f"Models: the tiny preset (~{first['parameters'] / 1e6:.1f} M parameters). Stage 1 (models/tiny-base, "
        "built by models/build_tiny_base.sh) pretrained it action-only on the project's own multi-task ManiSkill3 "
        "demonstrations; the demo's models are its stage-2 fine-tunes with selective transfer for "
        f"{config['train']['max_steps']} optimizer steps each on 2 CPU cores. The paper fine-tunes a 3B VLA: "
        "nothing here measures the paper's claims at its scale.",
        f"Rationales: the simulator teacher's four short sections (up to {mrt} tokens; longer ones are shortened "
        "per section, never dropped). The 'as trained' text in the rationale section shows exactly what the models "
        "saw.",
        "Closed-loop numbers come from one seed range; with 20-30 episodes per model a 95 % interval spans "
        "about ±20 points, so only large differences can show.",
        "Timings were taken on a shared machine; the load average is recorded with the run.",
    ]

    payload = {
        "mode": config["mode"], "claims": claims, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": context["machine"], "load_average": context.get("load_average"),
        "total_seconds": total_s, "total_cpu_seconds": total_cpu, "time_budget_s": budget, "stages": context["stages"],
        "data": context["collect"], "annotation": context["annotate"], "train": train,
        "success": {n: {k: v for k, v in r.items() if k != "episodes"} for n, r in success_rows},
        "models": {n: {"successes": e["successes"], "trials": e["trials"], "wilson95": e["wilson95"]}
                   for n, e in evals.items()},
        "references": {n: {"successes": r["successes"], "trials": r["trials"], "wilson95": r["wilson95"]}
                       for n, r in references.items()},
        "diagnostic": {n: a["diagnostic"] for n, a in analyses.items()},
        "examples": {n: a["examples"] for n, a in analyses.items()},
        "latency": latency_rows, "claims_text": success_text + diag_text, "limits": limits,
        "config": config, "sections": list(SECTIONS),
    }
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")

    # ---- HTML ----------------------------------------------------------------------------------------------
    def para(lines: list[str]) -> str:
        return "".join(f"<p>{html.escape(t)}</p>" for t in lines)

    example_blocks = []
    for k, _ in enumerate(frames):
        ex0 = first["examples"][k]
        parts = [f"<h3>example {k}: episode {ex0['episode']}, frame {ex0['frame']}</h3>",
                 f"<img src='example_{k}.png' alt='frame'><p><b>instruction:</b> {html.escape(ex0['instruction'])}</p>",
                 "<table><tr><th>source</th><th>rationale</th><th>action (dx, dy, dz m … gripper)</th></tr>",
                 f"<tr><td>teacher (simulator state), full</td><td class='r'>{html.escape(ex0['teacher_rationale'])}"
                 f"</td><td>{html.escape(_vec(ex0['label_action']))}</td></tr>",
                 f"<tr><td>teacher, as trained (≤ {mrt} tokens)</td><td class='r'>"
                 f"{html.escape(ex0['teacher_target'])}</td><td></td></tr>"]
        for name, a in analyses.items():
            ex = a["examples"][k]
            text = ex["generated_rationale"] if a["has_rationale"] else "(no rationale: λ_r = 0)"
            parts.append(f"<tr><td>{html.escape(name)}</td><td class='r'>{html.escape(text or '(empty)')}</td>"
                         f"<td>{html.escape(_vec(ex['action']))}</td></tr>")
        parts.append("</table>")
        example_blocks.append("".join(parts))
    loop_examples = []
    for name, e in evals.items():
        for x in e.get("rationale_examples", [])[:2]:
            loop_examples.append([name, x["seed"], x["step"], x["text"]])

    stage_head = ["stage", "wall seconds", "CPU seconds (all processes)", "this run"]
    stage_table = _table(stage_head, stage_rows)
    load = context.get("load_average")
    machine = context["machine"]
    timing_text = (f"Wall time of the stages before this report: {total_s / 60:.1f} min (budget {budget / 60:.0f} "
                   f"min); CPU time of all its processes: {total_cpu / 60:.1f} core-min, i.e. at least "
                   f"{total_cpu / cores / 60:.1f} min on {cores} idle cores. Load average (1/5/15 min) at start "
                   f"{load[:3] if load else '?'} and end {load[3:] if load else '?'} (other work on the machine "
                   f"stretches the wall time); {machine.get('cpu')}, {machine.get('cpu_count')} CPUs.")
    collect, annotate = context["collect"], context["annotate"]
    data_table = _table(
        ["episodes", "frames", "expert successes while collecting", "seeds", "frames with a teacher rationale",
         "teacher"],
        [[collect["episodes"], collect["frames"], collect["expert_successes"], str(collect["seeds"]),
          annotate["frames_with_rationale"], annotate["teacher"]]])
    curve_links = " ".join(f"<a href='loss_curve_{n}.png'>{html.escape(n)}</a>" for n in train)
    no_diag = ["No model of this run writes its rationale before the action, so there is no rationale to force."]
    stats_head = ["model", "frames", "parse into four sections", "parse rate, closed loop (policy_node)",
                  "distinct generated", "share of the most common",
                  "phase agrees with teacher",
                  "agreement of always the commonest phase", "exact match of the trained text"]
    loop_table = (_table(["model", "seed", "step", "rationale"], loop_examples) if loop_examples
                  else "<p>policy_node published no rationale text in these episodes.</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em} table{border-collapse:collapse;"
             "margin:0.5em 0} td,th{border:1px solid #bbb;padding:3px 6px;font-size:13px;vertical-align:top} "
             "td.r{max-width:650px;font-family:monospace;font-size:12px} .claim{background:#f4f4f4;padding:0.6em}")
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>refinevla demo ({html.escape(config['mode'])})</title>",
        f"<style>{style}</style><h1>refinevla demo — {html.escape(config['mode'])} run</h1>",
        "<section id='run'><h2>Run</h2><p>collect → annotate → train → closed-loop evaluation through the ROS nodes "
        f"→ this report. {html.escape(timing_text)}</p>",
        f"<div class='claim'>{para(success_text)}</div>{stage_table}</section>",
        f"<section id='data'><h2>Data</h2>{data_table}</section>",
        "<section id='training'><h2>Training: loss curves per term</h2><img src='losses.png' alt='loss curves'>",
        _table(train_head, train_rows),
        f"<p>Per-model curves: {curve_links}. Teacher-forced validation feeds the true previous tokens (and, for "
        "rationale-first models, the teacher's rationale).</p></section>",
        "<section id='success'><h2>Closed-loop success</h2><img src='success.png' alt='success'>",
        _table(success_head, success_table), f"<div class='claim'>{para(success_text)}</div></section>",
        "<section id='diagnostic'><h2>Forced-rationale diagnostic</h2><p>Action L1 (all 7 dimensions; then "
        "translation only) of greedy decoding on held-out frames: without a rationale, after the model's own "
        "generated rationale, and with the teacher's rationale (as trained) fed in its place. How to read it: an "
        "error lower with the teacher's rationale than with the model's own means the action head uses the "
        "rationale but the generated rationale is not grounded in the image; no difference means the action "
        "ignores the rationale. For the rationale-first model, (a) is the mode it was trained in on only the "
        "samples whose rationale was dropped (the rationale dropout). The trainer's validation action L1 in the "
        "training table is close to (c) for the "
        "rationale-first model, but it also feeds the true previous action tokens; here all 7 action tokens are "
        "decoded greedily, as in the closed loop.</p>",
        _table(diag_head, diag_rows), f"<div class='claim'>{para(diag_text or no_diag)}</div></section>",
        "<section id='rationales'><h2>Generated rationales next to the teacher's</h2>",
        _table(stats_head, rationale_stats), *example_blocks,
        "<h3>Rationales policy_node published during the closed-loop episodes</h3>", loop_table, "</section>",
        "<section id='attention'><h2>Attention of the action tokens over the image patches</h2>",
        "<img src='attention.png' alt='attention overlays'><p>Mean attention of the 7 action-token positions over "
        "the image patches (last language-model layer, heads averaged; red = more).</p></section>",
        f"<section id='latency'><h2>Latency per rationale mode</h2>{_table(latency_head, latency_rows)}</section>",
        f"<section id='limits'><h2>What this run does not show</h2>{para(limits)}</section>",
    ]
    page = "\n".join(parts) + "\n"
    (out / "index.html").write_text(page)

    md = [f"# refinevla demo — {config['mode']} run", "", f"Run {payload['time']}. {timing_text}", "",
          *success_text, "", "## Stages", "", *_md_table(stage_head, stage_rows), "", "## Training", "",
          *_md_table(train_head, train_rows), "", "## Closed-loop success", "",
          *_md_table(success_head, success_table),
          "", "## Forced-rationale diagnostic", "", *_md_table(diag_head, diag_rows), "", *diag_text, "",
          "## Rationales", "", *_md_table(stats_head, rationale_stats), "",
          "## Latency", "", *_md_table(latency_head, latency_rows), "", "## Limits", "",
          *[f"- {t}" for t in limits], "", "## Machine", "",
          *[f"- {k}: {v}" for k, v in machine.items()], ""]
    (out / "report.md").write_text("\n".join(md))
    return {"html": str(out / "index.html"), "json": str(out / "report.json"), "md": str(out / "report.md"),
            "pngs": [str(p) for p in (losses_png, success_png, attention_png)]}


def _trains_rationale(model: dict[str, Any]) -> bool:
    return model["lambda_rationale"] > 0 and model["rationale_dropout"] < 1.0


def _vec(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:+.3f}" for x in v) + "]"
