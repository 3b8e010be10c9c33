"""The annotation store: every teacher answer, kept once, surviving kill -9, shared by parallel shards.

One SQLite file in WAL mode, one row per (dataset, episode, frame, teacher, prompt hash), each written in its own
transaction the moment its reply arrives: a killed run loses at most the replies in flight, a rerun asks the teacher
only for frames with no row, and two runs never duplicate a frame (the key is the primary key). Failed frames are
rows too (status 'failed', with the reason and the raw reply) so they are retried only when asked; a 'done' row is
never overwritten. The store also remembers a digest of each episode's actions and instruction: pointing it at a
different dataset that happens to have the same name fails loudly instead of mixing annotations.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from refinevla_core.rationale import Rationale

SCHEMA_VERSION = 1
STORE_FILENAME = "annotations.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS episodes (
    dataset TEXT NOT NULL, episode INTEGER NOT NULL, digest TEXT NOT NULL, num_frames INTEGER NOT NULL,
    PRIMARY KEY (dataset, episode));
CREATE TABLE IF NOT EXISTS annotations (
    dataset TEXT NOT NULL, episode INTEGER NOT NULL, frame INTEGER NOT NULL,
    teacher TEXT NOT NULL, prompt_hash TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    rationale TEXT, reply TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
    calls INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL,
    PRIMARY KEY (dataset, episode, frame, teacher, prompt_hash),
    CHECK (status = 'failed' OR rationale IS NOT NULL));
"""


class StoreError(RuntimeError):
    """The store file is unusable or belongs to another dataset; the message names the fix."""


@dataclass(frozen=True)
class AnnotationKey:
    dataset: str
    teacher: str
    prompt_hash: str


@dataclass(frozen=True)
class AnnotationRow:
    episode: int
    frame: int
    status: str  # 'done' | 'failed'
    rationale: Rationale | None
    reply: str
    error: str
    calls: int
    prompt_tokens: int
    completion_tokens: int


class AnnotationStore:
    """SQLite (WAL) store of teacher answers. Use from one thread; open one per process (shards may share a file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder; pass the store file (e.g. {self.path / STORE_FILENAME})")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 60000")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous = NORMAL")  # with WAL: a killed process loses no commit
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM store_meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT OR IGNORE INTO store_meta VALUES ('schema_version', ?)",
                                 (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer refinevla (store schema {row[0]}); upgrade")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not an annotation store ({e}); choose another --out path") from None
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: SQLite could not enable WAL mode (got {mode}); put the store on a local "
                             "filesystem (network filesystems do not support it)")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AnnotationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- dataset identity ---------------------------------------------------------------------------------------
    def check_episodes(self, dataset: str, digests: dict[int, tuple[str, int]]) -> None:
        """Raise StoreError if this store knows any of these episodes with different content; else remember them."""
        known = dict(((e, d) for e, d in self._db.execute(
            "SELECT episode, digest FROM episodes WHERE dataset = ?", (dataset,))))
        for episode, (digest, _) in sorted(digests.items()):
            if episode in known and known[episode] != digest:
                raise StoreError(
                    f"{self.path} holds annotations for a different episode {episode} of a dataset called "
                    f"{dataset!r} (its actions/instruction differ); use another --out for this dataset, or pass "
                    "--dataset-id to tell the two datasets apart"
                )
        new = [(dataset, e, d, n) for e, (d, n) in digests.items() if e not in known]
        if new:
            with self._transaction():
                self._db.executemany("INSERT OR IGNORE INTO episodes VALUES (?, ?, ?, ?)", new)

    # ---- rows ---------------------------------------------------------------------------------------------------
    def statuses(self, key: AnnotationKey, episodes: Sequence[int] | None = None) -> dict[tuple[int, int], str]:
        """(episode, frame) -> 'done' | 'failed' for this dataset/teacher/prompt."""
        rows = self._db.execute(
            "SELECT episode, frame, status FROM annotations WHERE dataset = ? AND teacher = ? AND prompt_hash = ?",
            (key.dataset, key.teacher, key.prompt_hash),
        )
        wanted = set(episodes) if episodes is not None else None
        return {(e, f): s for e, f, s in rows if wanted is None or e in wanted}

    def put(self, key: AnnotationKey, episode: int, frame: int, rationale: Rationale | None, *, reply: str = "",
            error: str = "", calls: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Record one frame atomically. A 'done' row is never replaced; a 'failed' row is replaced by anything."""
        status = "done" if rationale is not None else "failed"
        if status == "failed" and not error:
            raise ValueError("a failed frame needs an error saying why")
        with self._transaction():
            self._db.execute(
                """INSERT INTO annotations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (dataset, episode, frame, teacher, prompt_hash) DO UPDATE SET
                     status = excluded.status, rationale = excluded.rationale, reply = excluded.reply,
                     error = excluded.error, calls = annotations.calls + excluded.calls,
                     prompt_tokens = annotations.prompt_tokens + excluded.prompt_tokens,
                     completion_tokens = annotations.completion_tokens + excluded.completion_tokens,
                     updated = excluded.updated
                   WHERE annotations.status != 'done'""",
                (key.dataset, episode, frame, key.teacher, key.prompt_hash, status,
                 json.dumps(rationale.to_dict()) if rationale is not None else None, reply, error,
                 calls, prompt_tokens, completion_tokens, time.time()),
            )

    def rows(self, key: AnnotationKey, episodes: Iterable[int] | None = None) -> dict[tuple[int, int], AnnotationRow]:
        query = ("SELECT episode, frame, status, rationale, reply, error, calls, prompt_tokens, completion_tokens "
                 "FROM annotations WHERE dataset = ? AND teacher = ? AND prompt_hash = ?")
        wanted = set(episodes) if episodes is not None else None
        out = {}
        for e, f, status, rationale, reply, error, calls, pt, ct in self._db.execute(
                query, (key.dataset, key.teacher, key.prompt_hash)):
            if wanted is not None and e not in wanted:
                continue
            r = Rationale.from_dict(json.loads(rationale)) if rationale else None
            out[(e, f)] = AnnotationRow(e, f, status, r, reply, error, calls, pt, ct)
        return out

    def rationales(self, key: AnnotationKey, episodes: Iterable[int] | None = None) -> dict[tuple[int, int], Rationale]:
        return {k: r.rationale for k, r in self.rows(key, episodes).items()
                if r.status == "done" and r.rationale is not None}

    def totals(self, key: AnnotationKey) -> dict[str, int]:
        """Counts and token sums over everything stored for this dataset/teacher/prompt."""
        done, failed, calls, pt, ct = self._db.execute(
            """SELECT COALESCE(SUM(status = 'done'), 0), COALESCE(SUM(status = 'failed'), 0),
                      COALESCE(SUM(calls), 0), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0)
               FROM annotations WHERE dataset = ? AND teacher = ? AND prompt_hash = ?""",
            (key.dataset, key.teacher, key.prompt_hash),
        ).fetchone()
        return {"done": done, "failed": failed, "calls": calls, "prompt_tokens": pt, "completion_tokens": ct}

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front, so shards queue, not fail."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
