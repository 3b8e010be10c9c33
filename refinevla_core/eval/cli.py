"""`refinevla eval`: closed-loop success rates of a checkpoint (or the scripted expert, or a random floor) in the
simulator, in-process or through the ROS nodes (the ROS package's `refinevla.eval_backends` entry point "ros"), with
a report (JSON, Markdown, HTML, plots, captioned videos).

    refinevla eval --checkpoint runs/ckpt --tasks PushCube-v1 --episodes 30 --seed 1000 --out eval/ckpt
    refinevla eval --policy expert --tasks PushCube-v1 PickCube-v1 --episodes 20 --via ros
    refinevla eval --checkpoint runs/ckpt --via ros-policy-node        # sim_bridge_node + policy_node processes
    refinevla eval --compare eval/a/report.json eval/b/report.json   # one SimplerEnv-style table

Seeds: episode i of each task uses seed --seed + i. `refinevla collect` starts at 0, so the default --seed 1000 keeps
evaluation scenes out of the training data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from refinevla_core.eval.report import run_name, simpler_table, write_report
from refinevla_core.eval.runner import EpisodeResult, evaluate, summarise
from refinevla_core.eval.stats import success_rate
from refinevla_core.inference.factory import PolicyLoadError, load_callable
from refinevla_core.inference.types import PolicyOutput
from refinevla_core.plugins import EVAL_BACKENDS
from refinevla_core.plugins import load as load_plugin
from refinevla_core.sim.backend import SimError
from refinevla_core.sim.config import SimConfig
from refinevla_core.sim.experts import ScriptedExpertPolicy


class RandomPolicy:
    """A floor: uniform translations within +-max_m per axis, no rotation, a random gripper — seeded."""

    def __init__(self, seed: int = 0, max_m: float = 0.05) -> None:
        self.rng = np.random.default_rng(seed)
        self.max_m = max_m

    def reset(self) -> None:
        """Keeps its generator: the same sequence of calls gives the same actions in every evaluation path."""

    def predict(self, image: np.ndarray, instruction: str) -> Any:
        a = np.zeros(7, np.float32)
        a[:3] = self.rng.uniform(-self.max_m, self.max_m, 3)
        a[6] = float(self.rng.integers(0, 2))
        return PolicyOutput(action=a, rationale_text="random action")


def policy_factory(args: argparse.Namespace) -> tuple[str, Callable[[Callable[[], dict]], Any]]:
    """(name, make(state_fn) -> policy). state_fn gives the privileged state (used by the expert only)."""
    if args.policy == "expert":
        return "scripted expert (privileged state)", ScriptedExpertPolicy
    if args.policy == "random":
        return "random", lambda state_fn: RandomPolicy(args.seed)
    if args.policy_factory:
        factory = load_factory(args.policy_factory)
        policy = factory()
        return args.name or args.policy_factory, lambda state_fn: policy
    if args.checkpoint is None:
        raise ValueError("name a checkpoint (--checkpoint DIR), --policy-factory pkg.module:callable, or "
                         "--policy expert|random")
    from refinevla_core.inference.policy import Policy, PolicyConfig

    policy = Policy.from_checkpoint(args.checkpoint, device=args.device,
                                    config=PolicyConfig(rationale_mode=args.rationale_mode,
                                                        rationale_every_n=args.rationale_every_n, seed=args.seed))
    return args.name or run_name(args.checkpoint), lambda state_fn: policy


def load_factory(spec: str) -> Callable[[], Any]:
    """'package.module:callable' -> the callable (as policy_node's policy_factory parameter); ValueError naming
    --policy-factory when it cannot be loaded."""
    try:
        return load_callable(spec, "--policy-factory")
    except PolicyLoadError as e:
        raise ValueError(str(e)) from e


def policy_node_params(args: argparse.Namespace) -> dict[str, Any]:
    """policy_node parameters for --via ros-policy-node."""
    if args.policy == "expert":
        raise ValueError("--via ros-policy-node runs policy_node, which has no privileged state: the scripted expert "
                         "needs --via ros or inprocess")
    if args.policy_factory:
        return {"policy_factory": args.policy_factory}
    if args.checkpoint is None:
        raise ValueError("--via ros-policy-node needs --checkpoint DIR (or --policy-factory)")
    return {"checkpoint": str(Path(args.checkpoint).resolve()), "device": args.device,
            "policy.rationale_mode": args.rationale_mode, "policy.rationale_every_n": args.rationale_every_n,
            "policy.seed": args.seed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (Policy.from_checkpoint)")
    parser.add_argument("--policy", choices=["checkpoint", "expert", "random"], default="checkpoint",
                        help="expert: the scripted expert reading privileged state (an upper reference, not a "
                             "model); random: a floor")
    parser.add_argument("--tasks", nargs="+", default=["PushCube-v1"], metavar="TASK",
                        help="simulator tasks to evaluate, e.g. PushCube-v1 PickCube-v1 (default PushCube-v1)")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--seed", type=int, default=1000, help="seed of episode 0 (collect starts at 0)")
    parser.add_argument("--policy-factory", default="",
                        help="package.module:callable returning an object with predict/reset (instead of a checkpoint)")
    parser.add_argument("--via", choices=["inprocess", "ros", "ros-policy-node"], default="inprocess",
                        help="ros: the policy runs here and acts through sim_bridge_node over DDS; ros-policy-node: "
                             "sim_bridge_node + policy_node processes, this process only resets and watches (both "
                             "started here, on $ROS_DOMAIN_ID)")
    parser.add_argument("--image-size", type=int, default=112,
                        help="square camera image size in pixels; use the size the model was trained on (default 112)")
    parser.add_argument("--max-steps", type=int, default=0, help="0 = the task's limit")
    parser.add_argument("--control-mode", default="pd_ee_delta_pose",
                        choices=["pd_ee_delta_pose", "pd_ee_target_delta_pose"],
                        help="how the simulator applies the 7-D action: a delta from the current end-effector pose "
                             "(default) or from the previous target")
    parser.add_argument("--instruction-mode", default="varied", choices=["varied", "canonical"],
                        help="varied: paraphrased instructions per episode (as in collect); canonical: the task's one "
                             "sentence")
    parser.add_argument("--rationale-mode", default="every_n", choices=["action_only", "every_step", "every_n"],
                        help="when the model writes its rationale before the action: never (fastest), every step, or "
                             "every --rationale-every-n steps (default)")
    parser.add_argument("--rationale-every-n", type=int, default=10,
                        help="steps between fresh rationales in every_n mode (default 10)")
    parser.add_argument("--device", default="cpu", help="torch device of the checkpoint: cpu (default), cuda, cuda:1")
    parser.add_argument("--videos", type=int, default=2, help="captioned videos per task (the first episodes)")
    parser.add_argument("--fps", type=float, default=5.0, help="video frame rate")
    parser.add_argument("--out", type=Path, default=Path("eval_report"), help="report folder")
    parser.add_argument("--name", default="",
                        help="the policy's name in the tables (default: the run folder, e.g. runs/tiny/final -> tiny)")
    parser.add_argument("--compare", nargs="+", type=Path, metavar="REPORT_JSON",
                        help="only print a SimplerEnv-style table of existing report.json files")


def compare(paths: list[Path]) -> str:
    rows, tasks = {}, []
    for p in paths:
        payload = json.loads(Path(p).read_text())
        name = payload["meta"].get("policy", p.parent.name)
        if name in rows:
            name = f"{name} ({p.parent.name})"
        rows[name] = {t: success_rate(s["successes"], s["trials"]) for t, s in payload["summary"].items()}
        tasks += [t for t in payload["summary"] if t not in tasks]
    return simpler_table(rows, tasks)


def run(args: argparse.Namespace) -> int:
    try:
        if args.compare:
            print(compare(args.compare))
            return 0
        if args.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {args.episodes}")
        sim = SimConfig(image_size=args.image_size, max_steps=args.max_steps, control_mode=args.control_mode,
                        instruction_mode=args.instruction_mode, task=args.tasks[0])
        if args.via == "ros-policy-node":
            node_params = policy_node_params(args)
            name = args.name or (args.policy_factory or run_name(args.checkpoint)) + " (policy_node)"
        else:
            name, make_policy = policy_factory(args)

        def progress(r: EpisodeResult) -> None:
            print(f"  {r.task} seed {r.seed}: {'success' if r.success else 'failure'} in {r.steps} steps "
                  f"({r.wall_s:.1f} s, {r.via})", file=sys.stderr)

        if args.via == "ros":
            evaluate_via_ros = load_plugin(EVAL_BACKENDS, "ros", "--via ros")
            results = evaluate_via_ros(make_policy, args.tasks, args.episodes, seed=args.seed, sim=sim,
                                       videos_per_task=args.videos, on_episode=progress,
                                       privileged_state=args.policy == "expert")
        elif args.via == "ros-policy-node":
            evaluate_via_ros = load_plugin(EVAL_BACKENDS, "ros", "--via ros-policy-node")
            results = evaluate_via_ros(None, args.tasks, args.episodes, seed=args.seed, sim=sim,
                                       videos_per_task=args.videos, on_episode=progress,
                                       policy_node_params=node_params)
        else:
            results = evaluate(lambda backend: make_policy(backend.privileged_state), args.tasks, args.episodes,
                               seed=args.seed, sim=sim, videos_per_task=args.videos, on_episode=progress)
    except (ValueError, SimError, FileNotFoundError, RuntimeError) as e:
        print(f"refinevla eval: {e}", file=sys.stderr)
        return 2
    meta = {"tasks": args.tasks, "episodes": args.episodes, "seed": args.seed, "via": args.via,
            "image_size": args.image_size, "control_mode": args.control_mode, "checkpoint": str(args.checkpoint or ""),
            "rationale_mode": args.rationale_mode if args.policy == "checkpoint" else "",
            "policy_factory": args.policy_factory}
    write_report(args.out, results, meta, policy_name=name, fps=args.fps)
    for task, s in summarise(results).items():
        print(f"{task}: {s.rate.text()}")
    print(f"report: {args.out / 'report.md'} (also report.json, report.html)")
    return 0
