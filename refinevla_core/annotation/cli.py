"""`refinevla annotate`: the command line of the annotation stage (parse, build the teacher, run, print a summary).

Flags override config/annotation.yaml (or --config), which overrides the built-in defaults; every problem found
before the run (bad dataset, unknown teacher, missing key, server down) is one line on stderr naming the fix, exit 1,
and nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from refinevla_core.annotation import make_teacher
from refinevla_core.annotation.config import TEACHERS, AnnotationConfig
from refinevla_core.annotation.runner import Shard, annotate_dataset, resolve_store_path
from refinevla_core.annotation.store import StoreError
from refinevla_core.annotation.teacher import TeacherError
from refinevla_core.config import ConfigError, find_config_file, load_config, parse_overrides
from refinevla_core.data.episode import DataError
from refinevla_core.io import atomic_write_json

EXIT_ERROR = 1
EXIT_FRAMES_FAILED = 4

EPILOG = """\
where annotations go:
  --out is the annotation store, one SQLite file holding every teacher reply (default: <dataset>/annotations.sqlite;
  an existing folder gets annotations.sqlite inside). A rerun asks the teacher only about frames the store does not
  have; shards may share one store file on a local disk. When the run finishes, the rationales are exported into
  <dataset>/rationales.jsonl (frames between every k-th carry the last rationale forward), which training reads.

examples:
  # offline, from simulator ground truth (datasets recorded by `refinevla collect`)
  refinevla annotate --dataset data/pushcube --teacher sim

  # Gemini through its OpenAI-compatible endpoint (export GEMINI_API_KEY=...)
  refinevla annotate --dataset data/bridge --teacher openai --model gemini-2.0-flash \\
      --base-url https://generativelanguage.googleapis.com/v1beta/openai --api-key-env GEMINI_API_KEY \\
      --concurrency 8 --requests-per-minute 1000 --every-k 5 --out runs/bridge-gemini.sqlite

  # a local vLLM server, no key (started with: vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000)
  refinevla annotate --dataset data/bridge --teacher openai --model Qwen/Qwen2.5-VL-7B-Instruct \\
      --base-url http://127.0.0.1:8000/v1 --api-key-env '' --concurrency 16

  # Ollama: --base-url http://127.0.0.1:11434/v1 --model qwen2.5vl:7b --api-key-env ''
  # OpenAI: --model gpt-4o-mini (key in OPENAI_API_KEY, the default --api-key-env)
  # a local Hugging Face VLM: --teacher hf --model /path/to/model_folder (or a cached hub id)
  # four processes: --shard 0/4, --shard 1/4, ... (episode e goes to shard e mod 4; shards on one machine may share
  #   --out; on separate machines each exports its own episodes: concatenate their rationales.jsonl files)

exit status: 0 all frames annotated; 1 error (nothing asked, or a run stopped - rerun to continue);
  4 finished with failed frames (rerun with --retry-failed)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--dataset", required=True, type=Path, help="dataset folder (refinevla episode format)")
    parser.add_argument("--teacher", choices=TEACHERS, help="who writes the rationales (default from config: sim)")
    parser.add_argument("--model", help="openai: served model name; hf: local folder or hub id")
    parser.add_argument("--base-url", help="OpenAI-compatible server URL up to /chat/completions, e.g. .../v1")
    parser.add_argument("--api-key-env", help="environment variable holding the API key ('' = none)")
    parser.add_argument("--out", type=Path, help="annotation store file (default <dataset>/annotations.sqlite)")
    parser.add_argument("--config", type=Path, help="annotation YAML (default: config/annotation.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                        help="override any config key, e.g. --set prompt.user=... --set temperature=0")
    parser.add_argument("--every-k", type=int, help="annotate every k-th frame, carry forward between (default 1)")
    parser.add_argument("--future-actions", type=int, help="demonstrated actions shown to the teacher (default 5)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (openai teacher; default 8)")
    parser.add_argument("--requests-per-minute", "--rpm", type=float, dest="requests_per_minute",
                        help="rate limit over all requests, retries included (0 = none)")
    parser.add_argument("--max-retries", type=int, help="retries per request on 429/5xx/timeouts (default 6)")
    parser.add_argument("--max-reasks", type=int, help="re-asks after an invalid reply before failing (default 2)")
    parser.add_argument("--timeout", type=float, dest="timeout_s", help="seconds per HTTP request (default 120)")
    parser.add_argument("--json-mode", choices=("auto", "on", "off"), help="request response_format json_object")
    parser.add_argument("--shard", default="0/1", help="i/n: annotate episodes with index %% n == i (default 0/1)")
    parser.add_argument("--retry-failed", action="store_true", help="ask again about frames that failed before")
    parser.add_argument("--no-export", action="store_true", help="only fill the store; skip rationales.jsonl")
    parser.add_argument("--dataset-id", help="name of the dataset in the store (default: its meta.json name)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar with rate and ETA (default: when stderr is a terminal)")
    parser.add_argument("--summary-json", type=Path, help="also write the end-of-run summary as JSON here")


FLAG_KEYS = ("teacher", "model", "base_url", "api_key_env", "every_k", "future_actions", "concurrency",
             "requests_per_minute", "max_retries", "max_reasks", "timeout_s", "json_mode")


def _shipped_config() -> Path | None:
    """The shipped config/annotation.yaml (source checkout, wheel or ROS share); None: the dataclass defaults."""
    try:
        return find_config_file("annotation")
    except ConfigError:
        return None


def build_config(args: argparse.Namespace) -> AnnotationConfig:
    """Defaults <- YAML (--config or config/annotation.yaml) <- --set overrides <- explicit flags.

    --set values stay verbatim for text fields (a prompt like "Task: {instruction}" stays text), see RawOverride.
    """
    path = args.config if args.config is not None else _shipped_config()
    overrides: dict[str, Any] = parse_overrides(args.overrides, example="temperature=0")
    for key in FLAG_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return load_config(AnnotationConfig, path, overrides)


def run(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"refinevla annotate: error: {message}", file=sys.stderr)
        return EXIT_ERROR

    try:
        shard = Shard.parse(args.shard)
    except ValueError as e:
        return fail(str(e))
    teacher = None
    try:
        config = build_config(args)
        teacher = make_teacher(config)
        summary = annotate_dataset(
            args.dataset, teacher, config, store_path=resolve_store_path(args.out, args.dataset), shard=shard,
            retry_failed=args.retry_failed, export=not args.no_export, progress=args.progress,
            dataset_id=args.dataset_id,
        )
    except (ConfigError, DataError, TeacherError, StoreError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("refinevla annotate: interrupted; finished frames are kept - rerun the same command to continue",
              file=sys.stderr)
        return 130
    finally:
        if teacher is not None:
            teacher.close()
    print(summary.text())
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.summary_json, summary.to_dict())
    return EXIT_FRAMES_FAILED if summary.any_failed else 0
