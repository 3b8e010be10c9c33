"""The annotation store: one row per key, 'done' is final, shards share a file, a different dataset is refused."""

from __future__ import annotations

import sqlite3

import pytest

from refinevla_core.annotation.store import AnnotationKey, AnnotationStore, StoreError
from refinevla_core.rationale import Rationale

KEY = AnnotationKey("bridge", "openai:m", "abc123")
R = Rationale("a spoon and a cup", "spoon not grasped yet", "spoon left of the cup", "move left, close gripper")
R2 = Rationale("a spoon", "grasped", "above the cup", "open gripper")


def test_round_trip_and_statuses(tmp_path):
    with AnnotationStore(tmp_path / "a.sqlite") as store:
        store.put(KEY, 0, 0, R, reply="{...}", calls=1, prompt_tokens=100, completion_tokens=40)
        store.put(KEY, 0, 5, None, reply="garbage", error="invalid reply after 3 attempt(s): empty", calls=3)
        store.put(AnnotationKey("bridge", "openai:m", "other"), 0, 0, R2, calls=1)
        assert store.statuses(KEY) == {(0, 0): "done", (0, 5): "failed"}
        assert store.rationales(KEY) == {(0, 0): R}
        row = store.rows(KEY)[(0, 5)]
        assert row.status == "failed" and row.reply == "garbage" and row.error.startswith("invalid reply")
        assert store.totals(KEY) == {"done": 1, "failed": 1, "calls": 4, "prompt_tokens": 100,
                                     "completion_tokens": 40}
    with AnnotationStore(tmp_path / "a.sqlite") as again:  # survives reopening
        assert again.rationales(KEY) == {(0, 0): R}


def test_done_is_final_and_failed_is_replaced(tmp_path):
    with AnnotationStore(tmp_path / "a.sqlite") as store:
        store.put(KEY, 1, 0, R, calls=1)
        store.put(KEY, 1, 0, R2, calls=1)
        store.put(KEY, 1, 0, None, error="later failure", calls=1)
        assert store.rationales(KEY) == {(1, 0): R}
        store.put(KEY, 1, 1, None, error="first try failed", calls=3)
        store.put(KEY, 1, 1, R2, calls=1)
        row = store.rows(KEY)[(1, 1)]
        assert row.status == "done" and row.rationale == R2 and row.error == "" and row.calls == 4
        with pytest.raises(ValueError, match="needs an error"):
            store.put(KEY, 1, 2, None)


def test_two_processes_worth_of_connections_share_one_file(tmp_path):
    path = tmp_path / "shared.sqlite"
    with AnnotationStore(path) as shard0, AnnotationStore(path) as shard1:
        shard0.put(KEY, 0, 0, R, calls=1)
        shard1.put(KEY, 1, 0, R2, calls=1)
        shard1.put(KEY, 0, 0, R2, calls=1)  # the same key from another writer: still one row, still R
        assert shard0.rationales(KEY) == shard1.rationales(KEY) == {(0, 0): R, (1, 0): R2}
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM annotations").fetchone()[0] == 2
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_different_dataset_with_the_same_name_is_refused(tmp_path):
    with AnnotationStore(tmp_path / "a.sqlite") as store:
        store.check_episodes("bridge", {0: ("d0", 10), 1: ("d1", 12)})
        store.check_episodes("bridge", {0: ("d0", 10), 2: ("d2", 8)})  # same content + a new episode: fine
        with pytest.raises(StoreError, match=r"different episode 1 of a dataset called 'bridge'.*--dataset-id"):
            store.check_episodes("bridge", {1: ("changed", 12)})
        store.check_episodes("bridge-v2", {1: ("changed", 12)})  # a different id keeps them apart


def test_unusable_paths_name_the_fix(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("this is not a database, it is a text file with enough bytes to look like one " * 20)
    with pytest.raises(StoreError, match=r"is not an annotation store.*choose another --out"):
        AnnotationStore(junk)
    with pytest.raises(StoreError, match="is a folder"):
        AnnotationStore(tmp_path)
