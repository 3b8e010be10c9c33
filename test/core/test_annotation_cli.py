"""`refinevla annotate`: kill -9 mid-run then rerun loses and duplicates nothing; bad input is one clear error, a
non-zero exit, and nothing written; --help shows Gemini and vLLM examples."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from refinevla_core import cli
from refinevla_core.annotation.local_server import ChatServer
from refinevla_core.data import Episode, EpisodeDataset
from test.core.annotation_util import frame_of_digest, make_dataset

ROOT = Path(__file__).resolve().parents[2]


def annotate_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "refinevla_core", "annotate", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def done_frames(store: Path) -> set[tuple[int, int]]:
    if not store.exists():
        return set()
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return set(db.execute("SELECT episode, frame FROM annotations WHERE status = 'done'"))
    except sqlite3.OperationalError:  # the schema is not there yet
        return set()
    finally:
        db.close()


def test_help_shows_gemini_and_vllm_examples():
    r = subprocess.run([sys.executable, "-m", "refinevla_core", "annotate", "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--base-url https://generativelanguage.googleapis.com/v1beta/openai --api-key-env GEMINI_API_KEY" \
        in r.stdout
    assert "--base-url http://127.0.0.1:8000/v1 --api-key-env ''" in r.stdout
    assert "--out is the annotation store" in r.stdout and "--shard" in r.stdout


@pytest.mark.parametrize("kill_after", [1, 10])
def test_kill_9_mid_run_then_rerun_finishes_with_nothing_lost_or_duplicated(tmp_path, kill_after):
    ds = make_dataset(tmp_path / "ds", episodes=3, frames=8)
    where = frame_of_digest(ds)
    store = tmp_path / "out" / "annotations.sqlite"
    everything = {(e, f) for e in range(3) for f in range(8)}
    with ChatServer(latency_s=0.15) as server:
        args = ["--dataset", str(tmp_path / "ds"), "--teacher", "openai", "--model", "stand-in", "--base-url",
                server.base_url, "--api-key-env", "", "--concurrency", "2", "--out", str(store)]
        first = annotate_process(*args)
        deadline = time.monotonic() + 120
        while len(done_frames(store)) < kill_after and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, f"the run ended before it could be killed: {first.communicate()}"
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
        assert first.returncode == -signal.SIGKILL
        kept = done_frames(store)
        assert kill_after <= len(kept) < len(everything)
        assert not (tmp_path / "ds" / "rationales.jsonl").exists()  # export happens only after a finished run

        asked_before = server.calls
        second = annotate_process(*args)
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err
        asked_again = [where[r.image_digests[0]] for r in server.requests[asked_before:]]

    assert not set(asked_again) & kept  # zero calls for frames that were done
    assert sorted(asked_again) == sorted(everything - kept)  # each missing frame asked exactly once
    assert done_frames(store) == everything
    db = sqlite3.connect(store)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == len(everything)
    db.close()
    rows = [json.loads(line) for line in (tmp_path / "ds" / "rationales.jsonl").read_text().splitlines()]
    assert sorted((r["episode"], r["frame"]) for r in rows) == sorted(everything)
    assert f"done: {len(everything) - len(kept)} new + {len(kept)} cached; failed: 0 new" in out
    assert "tokens: " in out and "prompt + " in out


# ---- bad input: one clear error, non-zero exit, nothing written ----------------------------------------------------
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_images_dataset(root: Path) -> None:
    ds = EpisodeDataset.create(root)
    ds.append(Episode(images=np.zeros((3, 0, 0, 3), np.uint8), actions=np.zeros((3, 7), np.float32),
                      instruction="pick up the carrot"))


def damaged_dataset(root: Path) -> None:
    make_dataset(root, episodes=1, frames=2)
    (root / "meta.json").write_text("{not json")


BAD_INPUTS = {
    "dataset missing": (lambda root: None, ["--teacher", "sim"], r"does not exist; pass the folder written by"),
    "dataset unreadable": (damaged_dataset, ["--teacher", "sim"], r"meta.json is not valid JSON"),
    "images missing": (no_images_dataset, ["--teacher", "openai", "--model", "m", "--api-key-env", ""],
                       r"episode 0 has no camera images .*--teacher sim"),
    "state missing": (lambda root: make_dataset(root, episodes=1, frames=2, states=False), ["--teacher", "sim"],
                      r"no privileged simulator state; .*refinevla collect.*--teacher openai or --teacher hf"),
    "api key missing": (lambda root: make_dataset(root, episodes=1, frames=2),
                        ["--teacher", "openai", "--model", "m", "--api-key-env", "REFINEVLA_UNSET_KEY"],
                        r"REFINEVLA_UNSET_KEY is not set; `export REFINEVLA_UNSET_KEY=...`"),
    "server down": (lambda root: make_dataset(root, episodes=1, frames=2),
                    ["--teacher", "openai", "--model", "m", "--api-key-env", "", "--base-url",
                     f"http://127.0.0.1:{closed_port()}/v1"], r"cannot reach http://127.0.0.1:\d+/v1 .*vllm serve"),
    "model missing": (lambda root: make_dataset(root, episodes=1, frames=2), ["--teacher", "openai"],
                      r"--model is required for --teacher openai"),
    "bad shard": (lambda root: make_dataset(root, episodes=1, frames=2), ["--teacher", "sim", "--shard", "3/2"],
                  r"shard 3/2 is invalid: use i/n with 0 <= i < n"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_clear_error_and_nothing_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("REFINEVLA_UNSET_KEY", raising=False)
    build, args, match = BAD_INPUTS[case]
    root = tmp_path / "ds"
    build(root)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = cli.main(["annotate", "--dataset", str(root), "--out", str(tmp_path / "store.sqlite"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("refinevla annotate: error: "), err
    assert re.search(match, err[0]), err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_unknown_teacher_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["annotate", "--dataset", str(tmp_path), "--teacher", "gemini"])
    assert exit_info.value.code == 2
    assert re.search(r"invalid choice: 'gemini' \(choose from '?sim'?, '?openai'?, '?hf'?\)", capsys.readouterr().err)


def test_failed_frames_exit_4_with_the_summary(tmp_path, capsys):
    make_dataset(tmp_path / "ds", episodes=1, frames=2)
    with ChatServer(fault_for=lambda body: "missing_section") as server:
        rc = cli.main(["annotate", "--dataset", str(tmp_path / "ds"), "--teacher", "openai", "--model", "m",
                       "--base-url", server.base_url, "--api-key-env", "", "--max-reasks", "1",
                       "--summary-json", str(tmp_path / "summary.json")])
    out = capsys.readouterr().out
    assert rc == 4
    assert "done: 0 new + 0 cached; failed: 2 new + 0 earlier" in out and "--retry-failed" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed"] == 2 and summary["calls"] == 4 and summary["prompt_tokens"] > 0
