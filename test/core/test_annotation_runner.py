"""Annotating a dataset end to end: every-k with carry-forward export, shards, failed frames, stopping runs, reruns
that ask nothing, and an export that never duplicates a row."""

from __future__ import annotations

import json

import pytest

from refinevla_core.annotation import (
    AnnotationConfig,
    AnnotationKey,
    AnnotationStore,
    OpenAICompatTeacher,
    Shard,
    SimTeacher,
    StoreError,
    TeacherError,
    annotate_dataset,
)
from refinevla_core.annotation.local_server import ChatServer, request_image_digests
from refinevla_core.data import EpisodeDataset
from test.core.annotation_util import frame_of_digest, make_dataset


def sim_config(**kw) -> AnnotationConfig:
    return AnnotationConfig(teacher="sim", **kw)


def openai_config(server: ChatServer, **kw) -> AnnotationConfig:
    return AnnotationConfig(teacher="openai", model="stand-in", base_url=server.base_url, backoff_base_s=0.0,
                            max_reasks=1, **kw)


def jsonl_rows(ds_root) -> list[dict]:
    path = ds_root / "rationales.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _digest_of(body: dict) -> str | None:
    digests = request_image_digests(body)
    return digests[0] if digests else None


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


def test_every_k_frames_then_carry_forward_and_a_rerun_asks_nothing(tmp_path):
    make_dataset(tmp_path / "ds", episodes=2, frames=7)
    config = sim_config(every_k=3)
    first = annotate_dataset(tmp_path / "ds", SimTeacher(), config, progress=False)
    assert (first.frames, first.scheduled, first.done, first.cached, first.calls) == (14, 6, 6, 0, 6)
    assert (first.exported_rows, first.frames_with_rationale) == (14, 14)
    ds = EpisodeDataset(tmp_path / "ds")
    episode = ds.load_episode(1)
    r = episode.rationales
    assert r[0] == r[1] == r[2] != r[3] and r[3] == r[4] == r[5] != r[6]
    assert "phase: approach," in r[0].situation_analysis and "phase: done," in r[6].situation_analysis
    assert [row["teacher"] for row in jsonl_rows(tmp_path / "ds")] == ["sim:v2"] * 14

    again = annotate_dataset(tmp_path / "ds", SimTeacher(), config, progress=False)
    assert (again.done, again.cached, again.calls, again.exported_rows) == (0, 6, 0, 0)
    assert len(jsonl_rows(tmp_path / "ds")) == 14  # nothing duplicated
    assert (tmp_path / "ds" / "annotations.sqlite").is_file()


def test_shards_cover_the_dataset_once(tmp_path, server):
    ds = make_dataset(tmp_path / "ds", episodes=5, frames=3)
    where = frame_of_digest(ds)
    config = openai_config(server, concurrency=2)
    asked: dict[str, list[tuple[int, int]]] = {}
    for i in range(3):
        before = server.calls
        summary = annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, shard=Shard(i, 3),
                                   store_path=tmp_path / "store.sqlite", progress=False)
        asked[str(i)] = [where[r.image_digests[0]] for r in server.requests[before:]]
        assert summary.episodes == len(range(i, 5, 3)) and summary.done == 3 * summary.episodes
    union = [frame for frames in asked.values() for frame in frames]
    assert sorted(union) == [(e, f) for e in range(5) for f in range(3)]  # whole, and no frame twice
    assert {e for e, _ in asked["0"]} == {0, 3} and {e for e, _ in asked["1"]} == {1, 4}
    rows = jsonl_rows(tmp_path / "ds")
    assert sorted((row["episode"], row["frame"]) for row in rows) == sorted(union)


def test_failed_frames_are_kept_and_retried_only_when_asked(tmp_path, server):
    ds = make_dataset(tmp_path / "ds", episodes=1, frames=6)
    bad = next(d for d, ef in frame_of_digest(ds).items() if ef == (0, 2))
    server.fault_for = lambda body: "missing_section" if _digest_of(body) == bad else None
    config = openai_config(server, every_k=2)
    first = annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, progress=False)
    assert (first.done, first.failed, first.calls) == (2, 1, 4)  # frame 2: one ask + one re-ask
    assert first.failures == ["episode 0 frame 2: invalid reply after 2 attempt(s): the reply is missing or has "
                              "empty section(s): Task Planning"]
    assert first.any_failed and "--retry-failed" in first.text()
    rationales = EpisodeDataset(tmp_path / "ds").load_episode(0).rationales
    assert [r is not None for r in rationales] == [True, True, False, False, True, True]

    calls = server.calls
    skipped = annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, progress=False)
    assert server.calls == calls and (skipped.failed_skipped, skipped.done, skipped.cached) == (1, 0, 2)

    server.fault_for = None
    retried = annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, progress=False,
                               retry_failed=True)
    assert server.calls == calls + 1 and (retried.done, retried.failed, retried.exported_rows) == (1, 0, 2)
    assert all(r is not None for r in EpisodeDataset(tmp_path / "ds").load_episode(0).rationales)
    with AnnotationStore(tmp_path / "ds" / "annotations.sqlite") as store:
        key = AnnotationKey("ds", "openai:stand-in", OpenAICompatTeacher(config).prompt_hash)
        assert store.rows(key)[(0, 2)].calls == 3  # the failed attempts' calls stay counted


def test_the_summary_adds_up_to_the_requests_the_server_saw(tmp_path):
    """Retried 429/500 answers and re-asks are teacher calls too: the summary's HTTP requests are what the server
    counted, split into replies (first asks + re-asks), retries by reason and unanswered requests."""
    make_dataset(tmp_path / "ds", episodes=2, frames=4)
    with ChatServer(plan=["429", "500", "429", "missing_section", "ok", "500"]) as server:
        config = openai_config(server, concurrency=2)
        summary = annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, progress=False)
        seen = server.calls
        replied = [r for r in server.requests if r.fault in ("ok", "missing_section")]  # 429/500: no reply
    assert (summary.done, summary.failed) == (8, 0)
    assert summary.http_requests == seen == 8 + 1 + 4, "8 frames, 1 re-ask, 4 retried failures"
    assert summary.calls == len(replied) == 9
    # (a re-ask that got a 500 is sent again: the server sees its body twice, the teacher asked again once)
    assert summary.retries == {"HTTP 429": 2, "HTTP 500": 2} and summary.re_asks == sum(r.is_reask for r in replied)
    assert summary.re_asks == 1
    assert summary.calls + sum(summary.retries.values()) == seen
    assert f"HTTP requests: {seen} = 9 replies (8 first asks + 1 re-asks) + 4 retried (2 x HTTP 429, 2 x HTTP 500)" \
        in summary.text()
    assert summary.to_dict()["http_requests"] == seen


def test_a_teacher_without_http_shows_its_replies_and_re_asks(tmp_path):
    make_dataset(tmp_path / "ds", episodes=1, frames=3)
    summary = annotate_dataset(tmp_path / "ds", SimTeacher(), sim_config(), progress=False)
    assert summary.http_requests is None and "teacher calls: 3 replies (3 first asks + 0 re-asks)" in summary.text()


def test_a_run_level_error_stops_keeps_finished_frames_and_skips_export(tmp_path, server):
    ds = make_dataset(tmp_path / "ds", episodes=2, frames=4)
    episode1 = {d for d, (e, _) in frame_of_digest(ds).items() if e == 1}
    server.fault_for = lambda body: "401" if _digest_of(body) in episode1 else None
    config = openai_config(server, concurrency=1)
    logged: list[str] = []
    with pytest.raises(TeacherError, match="rejected the API key"):
        annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, progress=False, log=logged.append)
    assert logged and "4 frame(s) annotated by this run are kept" in logged[0]
    assert not (tmp_path / "ds" / "rationales.jsonl").exists()
    server.fault_for = None
    before = server.calls
    summary = annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, progress=False)
    assert (summary.cached, summary.done) == (4, 4) and server.calls - before == 4
    assert {_digest_of(r.body) for r in server.requests[before:]} == episode1


def test_concurrency_is_bounded(tmp_path, server):
    make_dataset(tmp_path / "ds", episodes=3, frames=4)
    server.latency_s = 0.1
    config = openai_config(server, concurrency=4)
    summary = annotate_dataset(tmp_path / "ds", OpenAICompatTeacher(config), config, progress=False, export=False)
    assert summary.done == 12 and summary.exported_rows == 0
    assert 2 <= server.max_in_flight <= 4


def test_export_repairs_a_torn_last_line(tmp_path):
    make_dataset(tmp_path / "ds", episodes=1, frames=3)
    (tmp_path / "ds" / "rationales.jsonl").write_text('{"episode": 0, "frame": 0, "rationale": {"observ')
    summary = annotate_dataset(tmp_path / "ds", SimTeacher(), sim_config(), progress=False)
    assert summary.exported_rows == 3
    assert [(row["episode"], row["frame"]) for row in jsonl_rows(tmp_path / "ds")] == [(0, 0), (0, 1), (0, 2)]


def test_the_store_refuses_another_dataset_with_the_same_name(tmp_path):
    make_dataset(tmp_path / "a" / "ds", episodes=1, frames=3)
    make_dataset(tmp_path / "b" / "ds", episodes=1, frames=4)
    store = tmp_path / "shared.sqlite"
    annotate_dataset(tmp_path / "a" / "ds", SimTeacher(), sim_config(), store_path=store, progress=False)
    with pytest.raises(StoreError, match="different episode 0 of a dataset called 'ds'"):
        annotate_dataset(tmp_path / "b" / "ds", SimTeacher(), sim_config(), store_path=store, progress=False)
    assert not (tmp_path / "b" / "ds" / "rationales.jsonl").exists()
    other = annotate_dataset(tmp_path / "b" / "ds", SimTeacher(), sim_config(), store_path=store, progress=False,
                             dataset_id="ds-b")
    assert other.done == 4


def test_progress_bar_shows_rate_and_eta(tmp_path, capsys):
    make_dataset(tmp_path / "ds", episodes=1, frames=3)
    annotate_dataset(tmp_path / "ds", SimTeacher(), sim_config(), progress=True)
    err = capsys.readouterr().err
    assert "annotate [sim:v2]" in err and "3/3" in err and "frame/s" in err and "<00:00" in err
