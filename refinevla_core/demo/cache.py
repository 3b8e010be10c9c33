"""Stage markers for `refinevla demo`: a stage whose output exists under the same fingerprint is skipped on rerun,
a killed stage is resumed, and a stage whose configuration changed is redone from a clean folder.

Each stage (or sub-stage, e.g. `train:baseline`) has a marker `<out>/stages/<name>.json`:
    {"fingerprint": "...", "state": "running" | "done", "seconds": ..., "result": {...}}
The fingerprint is a hash of everything that defines the stage's output: its settings, the fingerprints of the
stages it reads from, and the versions of the code that writes it (the scripted expert, the sim teacher). A
different fingerprint means "another output": the stage's folders are removed first (only folders the demo made).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refinevla_core.io import atomic_write_json

MARKER_DIR = "stages"


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children: the load-independent cost of a
    stage (its wall time depends on what else runs on the machine)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dataclasses via their dict, Paths as text)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class StageOutcome:
    name: str
    fingerprint: str
    cached: bool
    seconds: float  # of the run that produced the output (0 added by a cached rerun)
    result: dict[str, Any]
    cpu_seconds: float = 0.0  # CPU time of that run, all processes together


class StageCache:
    """Markers under `<out>/stages`; `run()` decides between skip, resume and redo."""

    def __init__(self, out: Path, log: Callable[[str], None] | None = None) -> None:
        self.out = Path(out)
        self.dir = self.out / MARKER_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda message: print(message, flush=True))
        self.outcomes: list[StageOutcome] = []

    def _path(self, name: str) -> Path:
        return self.dir / f"{name.replace(':', '__')}.json"

    def marker(self, name: str) -> dict[str, Any] | None:
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a torn marker (written atomically, so only by hand): treat the stage as not run

    def is_done(self, name: str, fp: str) -> bool:
        m = self.marker(name)
        return bool(m and m.get("fingerprint") == fp and m.get("state") == "done")

    def run(self, name: str, fp: str, outputs: Sequence[Path], work: Callable[[], dict[str, Any]],
            what: str = "") -> StageOutcome:
        """Skip (done, same fingerprint, outputs present), resume (running, same fingerprint) or redo (otherwise:
        `outputs` are removed first). `work()` returns the stage's JSON-able result."""
        m = self.marker(name)
        if m and m.get("fingerprint") == fp and m.get("state") == "done" and all(p.exists() for p in outputs):
            outcome = StageOutcome(name, fp, True, float(m.get("seconds", 0.0)), m.get("result") or {},
                                   float(m.get("cpu_seconds", 0.0)))
            self.log(f"    {name}: cached, skipped (fingerprint {fp}; took {outcome.seconds:.1f} s when it ran)")
            self.outcomes.append(outcome)
            return outcome
        if m and m.get("fingerprint") == fp:
            self.log(f"    {name}: resuming an interrupted run{': ' + what if what else ''}")
        else:
            if m:
                self.log(f"    {name}: configuration changed ({m.get('fingerprint')} -> {fp}); redoing it")
            for p in outputs:
                self._remove(p)
            self.log(f"    {name}: {what}" if what else f"    {name}: running")
        started, cpu = time.perf_counter(), cpu_seconds()
        atomic_write_json(self._path(name), {"fingerprint": fp, "state": "running", "started": time.time()})
        result = work()
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        atomic_write_json(self._path(name), {"fingerprint": fp, "state": "done", "seconds": round(seconds, 3),
                                             "cpu_seconds": round(cpu, 3),
                                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "result": result})
        outcome = StageOutcome(name, fp, False, seconds, result, cpu)
        self.outcomes.append(outcome)
        self.log(f"    {name}: done in {seconds:.1f} s")
        return outcome

    def run_group(self, items: dict[str, tuple[str, Sequence[Path]]],
                  work: Callable[[list[str]], dict[str, dict[str, Any]]]) -> dict[str, StageOutcome]:
        """Like run() for sub-stages done together (e.g. the models trained side by side): cached items are
        skipped one by one, `work(pending names)` runs the rest at once and returns a result per name."""
        outcomes: dict[str, StageOutcome] = {}
        pending = []
        for name, (fp, outputs) in items.items():
            m = self.marker(name)
            if m and m.get("fingerprint") == fp and m.get("state") == "done" and all(p.exists() for p in outputs):
                outcomes[name] = StageOutcome(name, fp, True, float(m.get("seconds", 0.0)), m.get("result") or {},
                                              float(m.get("cpu_seconds", 0.0)))
                self.log(f"    {name}: cached, skipped (fingerprint {fp}; took {outcomes[name].seconds:.1f} s "
                         "when it ran)")
                continue
            if m and m.get("fingerprint") == fp:
                self.log(f"    {name}: resuming an interrupted run")
            else:
                if m:
                    self.log(f"    {name}: configuration changed ({m.get('fingerprint')} -> {fp}); redoing it")
                for p in outputs:
                    self._remove(p)
            atomic_write_json(self._path(name), {"fingerprint": fp, "state": "running", "started": time.time()})
            pending.append(name)
        if pending:
            started, cpu = time.perf_counter(), cpu_seconds()
            results = work(pending)
            seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
            for name in pending:
                fp = items[name][0]
                atomic_write_json(self._path(name), {"fingerprint": fp, "state": "done", "seconds": round(seconds, 3),
                                                     "cpu_seconds": round(cpu, 3),
                                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                     "result": results[name]})
                outcomes[name] = StageOutcome(name, fp, False, seconds, results[name], cpu)
            self.log(f"    {', '.join(pending)}: done in {seconds:.1f} s")
        self.outcomes += [outcomes[n] for n in items]
        return {n: outcomes[n] for n in items}

    def _remove(self, path: Path) -> None:
        path = Path(path)
        if not path.resolve().is_relative_to(self.out.resolve()):
            raise ValueError(f"refusing to remove {path}: it is outside the demo folder {self.out}")
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def banner(index: int, total: int, title: str, detail: str = "") -> None:
    """A stage header everyone can follow in a terminal or a CI log."""
    line = f"==> [{index}/{total}] {title}"
    print(f"\n{line}" + (f"  ({detail})" if detail else ""), flush=True)
    sys.stderr.flush()


def advance_bar(bar: Any, n: int) -> None:
    """Move a tqdm bar forward to `n` (redrawn only when it moves, so CI logs stay short)."""
    if n > bar.n:
        bar.update(n - bar.n)
