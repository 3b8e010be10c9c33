"""The demo's offline measurements of each trained model on held-out frames (the validation episodes of its run):

- forced-rationale diagnostic: action L1 of greedy decoding (a) without a rationale, (b) after the model's own
  generated rationale, (c) with the teacher's rationale fed in its place — (b) vs (c) separates "the rationale is
  not grounded in the image" from "the action head does not use the rationale";
- rationales the model writes next to the teacher's for the same frames (and how many distinct ones it writes);
- attention of the action tokens over the image patches (PNG overlays);
- per-step latency of the Policy in each rationale mode, as ratios against action-only measured in the same run.

Runs in worker processes (one torch thread each); everything written goes under the model's analysis folder.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.io import atomic_write_json as write_json
from refinevla_core.rationale import RationaleError, parse_rationale
from refinevla_core.training.data import EpisodeFrames, split_episodes, validation_indices

BATCH = 8
_PHASE = re.compile(r"phase: (\w+)")  # "phase: push, ..." (sim teacher v2; v1 wrote "Current phase: push")


def validation_frames(dataset: str | Path, val_fraction: float, seed: int) -> Any:
    """The validation frames of a training run (the trainer's own split)."""
    ds = EpisodeDataset(dataset)
    _, val_eps = split_episodes(len(ds), val_fraction, seed)
    return EpisodeFrames(ds, val_eps, seed=seed)


def pick(n_items: int, n: int) -> list[int]:
    return validation_indices(n_items, n)


def phase_of(text: str) -> str | None:
    m = _PHASE.search(text or "")
    return m.group(1) if m else None


def parses(text: str) -> bool:
    """Whether a generated rationale holds all four sections (refinevla_core.rationale.parse_rationale)."""
    try:
        parse_rationale(text)
    except RationaleError:
        return False
    return True


def _l1(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    err = np.abs(np.asarray(pred, np.float64) - np.asarray(truth, np.float64))
    return {"l1": float(err.mean()), "l1_xyz": float(err[:, :3].mean()), "l1_per_dim": [float(v) for v in
                                                                                        err.mean(0)]}


def forced_rationale_diagnostic(model: Any, samples: list[Any], has_rationale: bool) -> dict[str, Any]:
    """Action L1 per rationale source on `samples` (TrainingSample with the teacher's rationale)."""
    proc = model.processor
    order = model.refinevla_config.target_order
    truth = np.stack([s.action for s in samples])
    rows: dict[str, list[np.ndarray]] = {"action_only": [], "generated": [], "teacher": []}
    texts: list[str] = []
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        images, instructions = [s.image for s in chunk], [s.instruction for s in chunk]
        plain = model.generate(images, instructions, plan="action")
        rows["action_only"] += [proc.decode_actions(g.action_bins) for g in plain]
        if not has_rationale:
            continue
        own = model.generate(images, instructions, plan=order)
        texts += [proc.decode_text(g.rationale_ids) for g in own]
        rows["generated"] += [proc.decode_actions(g.action_bins) for g in own]
        if order == "rationale_then_action":
            fed = [proc.rationale_ids(s.rationale) for s in chunk]
            forced = model.generate(images, instructions, plan="action", fed_rationales=fed)
            rows["teacher"] += [proc.decode_actions(g.action_bins) for g in forced]
    out: dict[str, Any] = {"frames": len(samples), "target_order": order,
                           "mean_action": _l1(np.repeat(model.stats.mean[None], len(samples), 0), truth)}
    for key, preds in rows.items():
        if preds:
            out[key] = _l1(np.stack(preds), truth)
    # one action for every frame = the marginal was learnt, not the image (the report says so)
    out["distinct_actions"] = len({tuple(np.round(a, 5)) for a in rows["action_only"]})
    if texts:
        teacher = [proc.decode_text(proc.rationale_ids(s.rationale)) for s in samples]
        phases = [(phase_of(g), phase_of(t)) for g, t in zip(texts, teacher, strict=True)]
        known = [(g, t) for g, t in phases if t is not None]
        out["rationales"] = {
            "distinct_generated": len(set(texts)), "frames": len(texts),
            "most_common_share": max(texts.count(t) for t in set(texts)) / len(texts),
            "exact_match_teacher_target": sum(g == t for g, t in zip(texts, teacher, strict=True)) / len(texts),
            "phase_stated": sum(g is not None for g, _ in known), "phase_frames": len(known),
            "phase_agreement": (sum(g == t for g, t in known) / len(known)) if known else None,
            # what always stating the most common teacher phase would score: the base rate of the agreement
            "phase_base_rate": (max(sum(t == p for _, t in known) for _, p in known) / len(known)) if known else None,
            "mean_chars": float(np.mean([len(t) for t in texts])),
            "parse_rate": float(np.mean([parses(t) for t in texts])),
        }
    return out


def examples(model: Any, samples: list[Any], has_rationale: bool, out_dir: Path) -> list[dict[str, Any]]:
    """Per example frame: the teacher's rationale (full and as trained), the model's, its action, and the attention
    overlay PNG of its action tokens."""
    from refinevla_core.attention import action_attention

    proc = model.processor
    order = model.refinevla_config.target_order
    with_rationale = has_rationale and order == "rationale_then_action"
    rows = []
    for k, s in enumerate(samples):
        amap = action_attention(model, s.image, s.instruction, with_rationale=with_rationale)
        png = amap.save_png(out_dir / "attention" / f"example_{k}.png", s.image)
        generated = ""
        if has_rationale:
            (g,) = model.generate([s.image], [s.instruction], plan=order)
            generated = proc.decode_text(g.rationale_ids)
        rows.append({
            "episode": s.episode, "frame": s.frame, "instruction": s.instruction,
            "teacher_rationale": s.rationale.text() if s.rationale else "",
            "teacher_target": proc.decode_text(proc.rationale_ids(s.rationale)) if s.rationale else "",
            "generated_rationale": generated, "action": [float(v) for v in amap.action],
            "label_action": [float(v) for v in s.action], "attention_png": str(png),
            "attention_image_share": float(amap.image_share.mean()),
            "attention_peak_patch": [int(v) for v in np.unravel_index(int(amap.grid.argmax()), amap.grid.shape)],
        })
    return rows


def latency(model: Any, images: list[np.ndarray], instruction: str, *, has_rationale: bool, steps: int,
            every_n: int) -> list[dict[str, Any]]:
    """Mean per-step wall time of Policy.predict per rationale mode, modes interleaved in rounds, ratio vs
    action-only of the same run."""
    from refinevla_core.inference.policy import Policy, PolicyConfig

    modes = [("action_only", 1)] + ([("every_step", 1), ("every_n", every_n)] if has_rationale else [])
    policies = {m: Policy(model, PolicyConfig(rationale_mode=m, rationale_every_n=n)) for m, n in modes}
    samples: dict[str, list[float]] = {m: [] for m in policies}
    for policy in policies.values():  # warm-up
        policy.predict(images[0], instruction)
        policy.reset()
    rounds = 2 if steps >= 4 else 1
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for mode, policy in policies.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                policy.predict(images[(len(samples[mode])) % len(images)], instruction)
                samples[mode].append((time.perf_counter() - t0) * 1e3)
    base = float(np.mean(samples["action_only"]))
    return [{"mode": m if m != "every_n" else f"every_{every_n}", "steps": len(v), "mean_ms": float(np.mean(v)),
             "median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)),
             "ratio_vs_action_only": float(np.mean(v)) / base} for m, v in samples.items()]


def analyze_model(spec: dict[str, Any]) -> dict[str, Any]:
    """Everything above for one model (the function a worker process runs); writes <out_dir>/analysis.json."""
    import torch

    from refinevla_core.model.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    started = time.perf_counter()
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_checkpoint(spec["checkpoint"])
    frames = validation_frames(spec["dataset"], spec["val_fraction"], spec["split_seed"])
    if len(frames) == 0:
        raise RuntimeError(f"{spec['dataset']} has no validation frames for the split of {spec['name']}")
    has_rationale = bool(spec["has_rationale"])
    diagnostic = forced_rationale_diagnostic(model, [frames[i] for i in pick(len(frames), spec["diagnostic_frames"])],
                                             has_rationale)
    example_rows = examples(model, [frames[i] for i in pick(len(frames), spec["example_frames"])], has_rationale,
                            out_dir)
    first = frames[0]
    episode_images = [frames[i].image for i in range(len(frames)) if frames.refs[i][0] == first.episode]
    latency_rows = latency(model, episode_images, first.instruction, has_rationale=has_rationale,
                           steps=spec["latency_steps"], every_n=spec["every_n"])
    result = {"name": spec["name"], "checkpoint": spec["checkpoint"], "target_order":
              model.refinevla_config.target_order, "has_rationale": has_rationale,
              "max_rationale_tokens": int(model.refinevla_config.max_rationale_tokens),
              "parameters": int(model.num_parameters()), "diagnostic": diagnostic, "examples": example_rows,
              "latency": latency_rows, "seconds": round(time.perf_counter() - started, 2)}
    write_json(out_dir / "analysis.json", result)
    return result
