"""`refinevla train`: the command line of the training stage (load the config, train or resume, print a summary).

Light at import time (no torch): `refinevla --help` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import sys

from refinevla_core.config import ConfigError, find_config_file, parse_overrides, to_dict
from refinevla_core.training.config import load_train_config

EXIT_ERROR = 2

EPILOG = """\
examples:
  # tiny random-init preset on a dataset written by `refinevla collect` and annotated by `refinevla annotate`
  refinevla train --config train_tiny dataset=data/pushcube output_dir=runs/tiny

  # a preset is found by name from any folder (train_tiny, train_mid, train_paligemma2_3b); a path works too
  refinevla train --config my_train.yaml dataset=data/pushcube --print-config

  # the paper's settings: vision + lower 75 % of the language layers frozen, λ_r = 0.3, rationale first
  refinevla train --config train_mid dataset=data/pushcube freeze.language_layers=0.75 \\
      lambda_rationale=0.3 target_order=rationale_then_action

  # the ablation baseline (plain action fine-tuning), LoRA, bf16, gradient accumulation
  refinevla train --config train_mid dataset=data/pushcube lambda_rationale=0 \\
      lora.enabled=true precision=bf16 grad_accumulation=4

  # several GPUs (DDP) from the same entry point (FSDP/DeepSpeed are refused: see trainer._check_distributed_type)
  accelerate launch --multi_gpu --num_processes 4 -m refinevla_core train --config train_paligemma2_3b \\
      dataset=/data/bridge base_checkpoint=/models/paligemma2-3b-pt-224
  # several CPU processes (DDP over gloo; accelerate launch needs MPI for that, torchrun does not)
  torchrun --nproc_per_node 2 -m refinevla_core train --config train_tiny dataset=data/pushcube

A run killed at any point resumes from its newest checkpoint when started again with the same command
(resume=auto); the final model is <output_dir>/final, loadable with Policy.from_checkpoint.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True,
                        help="a shipped preset by name (train_tiny, train_mid, train_paligemma2_3b) or a training "
                             "YAML path (keys: refinevla_core/training/config.py)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override config keys, dotted for nested ones: freeze.language_layers=6 lora.enabled=true")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")


def run(args: argparse.Namespace) -> int:
    from refinevla_core.data.episode import DataError

    try:
        config = load_train_config(find_config_file(args.config, prefix="train_"),
                                   parse_overrides(args.overrides, example="max_steps=100"))
    except ConfigError as e:
        print(f"refinevla train: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.print_config:
        print(json.dumps(to_dict(config), indent=1))
        return 0
    from refinevla_core.model.checkpoint import CheckpointError
    from refinevla_core.model.modeling_refinevla import ModelError
    from refinevla_core.model.processor_refinevla import ProcessorError
    from refinevla_core.training.trainer import train

    try:
        result = train(config)
    except (ConfigError, DataError, CheckpointError, ModelError, ProcessorError) as e:
        print(f"refinevla train: {e}", file=sys.stderr)
        return EXIT_ERROR
    if not result.main_process:
        return 0
    final_val = result.metrics["val"][-1] if result.metrics["val"] else {}
    last = result.metrics["train"][-1] if result.metrics["train"] else {}
    summary = {
        "final_checkpoint": str(result.final_checkpoint),
        "steps": result.metrics["step"],
        "train_seconds": result.metrics["train_seconds"],
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "last_train_losses": {k: v for k, v in last.items() if k.startswith("loss")},
        "validation": {k: v for k, v in final_val.items() if k != "action_l1_per_dim"},
        "metrics": str(result.output_dir / "metrics.json"),
        "loss_curve": str(result.output_dir / "loss_curve.png"),
    }
    print(json.dumps(summary, indent=1, default=str))
    return 0
