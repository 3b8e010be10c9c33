"""refinevla_core.io: a reader sees the old file/folder or the new one, never half, and a failed write loses nothing;
refinevla_core.stamps: ROS time stamps <-> nanoseconds."""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace

import numpy as np
import pytest

from refinevla_core.io import atomic_write_bytes, atomic_write_json, folder_built_in_place_of, swap_folder
from refinevla_core.stamps import split_ns, stamp_to_ns


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("old")
    atomic_write_json(path, {"a": np.float32(0.5), "b": np.arange(3), "c": np.int64(7)})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1, 2], "c": 7}
    assert path.read_text().endswith("\n")
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"old": true}')
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        atomic_write_json(path, {"x": object()})
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_swap_folder_replaces_an_existing_folder_whole(tmp_path):
    target, tmp = tmp_path / "ds", tmp_path / ".ds.new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    swap_folder(tmp, target)
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # the old folder set aside is gone


def test_folder_built_in_place_of_swaps_on_success_and_keeps_the_target_on_failure(tmp_path):
    target = tmp_path / "ds"
    target.mkdir()
    (target / "keep.txt").write_text("v1")
    with pytest.raises(RuntimeError, match="half way"), folder_built_in_place_of(target, tmp_path / ".ds.tmp") as tmp:
        tmp.mkdir()
        (tmp / "partial.txt").write_text("half")
        raise RuntimeError("half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    assert (target / "keep.txt").read_text() == "v1"
    (tmp_path / ".ds.tmp").mkdir()  # a leftover from a killed run is cleared first
    (tmp_path / ".ds.tmp" / "stale.txt").write_text("stale")
    with folder_built_in_place_of(target, tmp_path / ".ds.tmp") as tmp:
        tmp.mkdir(exist_ok=True)
        assert not (tmp / "stale.txt").exists()
        (tmp / "new.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize("ns", [0, 1, 999_999_999, 1_000_000_000, 1_733_230_000_123_456_789])
def test_stamps_round_trip(ns):
    sec, nanosec = split_ns(ns)
    assert 0 <= nanosec < 1_000_000_000
    assert stamp_to_ns(SimpleNamespace(sec=sec, nanosec=nanosec)) == ns
    assert stamp_to_ns({"sec": sec, "nanosec": nanosec}) == ns  # the JSON form the sim bridge publishes
