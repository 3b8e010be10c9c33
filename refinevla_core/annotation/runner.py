"""Annotating a whole dataset: check everything first, ask the teacher only what is missing, export when done.

The order matters for users with 100k frames and a paid API:
1. preflight, before anything is written: the dataset opens, every episode of the shard has what the teacher needs
   (images, or privileged state), the teacher is reachable and accepts the key;
2. schedule frames 0, k, 2k, ... of the shard's episodes (episode e belongs to shard e mod n, so shards never
   overlap and carry-forward never crosses a shard), minus what the store already holds;
3. keep `teacher.concurrency` requests in flight, store each reply the moment it arrives (kill -9 safe), show a
   progress bar with rate and ETA; a run-level error stops new requests, keeps finished ones, and is raised;
4. export: join the store's rationales into the dataset's rationales.jsonl (EpisodeDataset.add_rationales), the
   frames between annotated ones carrying the last rationale forward; only rows that change are appended, so a
   rerun or a killed export never duplicates anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from refinevla_core.annotation.config import AnnotationConfig
from refinevla_core.annotation.store import STORE_FILENAME, AnnotationKey, AnnotationStore
from refinevla_core.annotation.teacher import FrameRequest, Teacher, TeacherReply
from refinevla_core.data.episode import DataError
from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.rationale import Rationale

EXPORT_CHUNK_ROWS = 5000


@dataclass(frozen=True)
class Shard:
    """Episode e belongs to shard `index` of `count` when e % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count} is invalid: use i/n with 0 <= i < n (e.g. 0/4)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            i, n = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"--shard {text!r} must look like i/n, e.g. 0/4 for the first of four shards") from None
        return cls(i, n)

    def owns(self, episode: int) -> bool:
        return episode % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class RunSummary:
    """What a run did; `text()` is the end-of-run summary the CLI prints."""

    dataset: str
    dataset_id: str
    store: str
    teacher: str
    prompt_hash: str
    shard: str
    episodes: int = 0
    frames: int = 0  # frames of the shard's episodes
    scheduled: int = 0  # frames the teacher is asked about (every k-th)
    cached: int = 0  # already done in the store: no teacher call
    done: int = 0  # annotated by this run
    failed: int = 0  # failed in this run (invalid replies after re-asks)
    failed_skipped: int = 0  # failed in an earlier run and not retried (pass retry_failed)
    calls: int = 0  # model replies received (first asks + re-asks)
    http_requests: int | None = None  # POSTs the server saw (HTTP teachers only): calls + retried + unanswered
    retries: dict[str, int] = field(default_factory=dict)  # retried attempts by reason, e.g. {"HTTP 429": 8}
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    exported_rows: int = 0
    frames_with_rationale: int = 0
    failures: list[str] = field(default_factory=list)  # a few examples: "episode 3 frame 10: <reason>"

    @property
    def pending(self) -> int:
        return self.scheduled - self.cached - self.done - self.failed - self.failed_skipped

    @property
    def any_failed(self) -> bool:
        return self.failed + self.failed_skipped > 0

    @property
    def re_asks(self) -> int:
        """Calls beyond the first per frame: an invalid reply asked again with the parse error."""
        return self.calls - self.done - self.failed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pending": self.pending, "re_asks": self.re_asks}

    def calls_text(self) -> str:
        """Teacher calls as the server counts them: every HTTP request is a reply (first ask or re-ask), a retried
        failure (429/5xx/timeout, by reason) or one left unanswered (a JSON-mode probe, the last of a failing run)."""
        asked = f"{self.calls} replies ({self.done + self.failed} first asks + {self.re_asks} re-asks)"
        if self.http_requests is None:
            return f"teacher calls: {asked}"
        retried = sum(self.retries.values())
        reasons = ", ".join(f"{n} x {why}" for why, n in sorted(self.retries.items()))
        parts = [asked, f"{retried} retried" + (f" ({reasons})" if reasons else "")]
        unanswered = self.http_requests - self.calls - retried
        if unanswered:
            parts.append(f"{unanswered} unanswered")
        return f"HTTP requests: {self.http_requests} = " + " + ".join(parts)

    def text(self) -> str:
        lines = [
            f"annotated {self.dataset} (id {self.dataset_id!r}, shard {self.shard}) with {self.teacher} "
            f"[prompt {self.prompt_hash}] in {self.elapsed_s:.1f} s",
            f"  frames: {self.frames} in {self.episodes} episode(s); asked about {self.scheduled}",
            f"  done: {self.done} new + {self.cached} cached; failed: {self.failed} new + {self.failed_skipped} earlier"
            + (f"; not reached: {self.pending}" if self.pending else ""),
            f"  {self.calls_text()}; tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion",
            f"  store: {self.store}",
        ]
        if self.exported_rows or self.frames_with_rationale:
            lines.append(f"  export: {self.frames_with_rationale}/{self.frames} frames have a rationale in "
                         f"{self.dataset}/rationales.jsonl ({self.exported_rows} rows written now)")
        for failure in self.failures:
            lines.append(f"  failed: {failure}")
        if self.any_failed:
            lines.append("  rerun with --retry-failed to ask the teacher again about the failed frames")
        return "\n".join(lines)


def default_store_path(dataset_root: str | Path) -> Path:
    return Path(dataset_root) / STORE_FILENAME


def resolve_store_path(out: str | Path | None, dataset_root: str | Path) -> Path:
    """--out: a store file; an existing folder (or a path ending in /) gets annotations.sqlite inside it."""
    if out is None:
        return default_store_path(dataset_root)
    text = str(out)
    path = Path(out).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        return path / STORE_FILENAME
    return path


def open_dataset(root: str | Path) -> EpisodeDataset:
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset {root} does not exist; pass the folder written by `refinevla collect` or "
                        "`refinevla convert` (it holds meta.json and episodes/)")
    ds = EpisodeDataset(root)
    if len(ds) == 0:
        raise DataError(f"dataset {root} has no episodes; record some with `refinevla collect` or "
                        "`refinevla convert` first")
    return ds


def episode_digest(actions: np.ndarray, instruction: str) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(actions, dtype=np.float32).tobytes())
    h.update(instruction.encode())
    return h.hexdigest()[:24]


def _check_images(ds: EpisodeDataset, episode: int, info: dict[str, Any], where: str) -> None:
    npz = ds.root / "episodes" / f"{episode:06d}.npz"
    shape = info.get("image_shape") or []
    try:
        with zipfile.ZipFile(npz) as z:
            has_images = "images.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{where}: {npz} is unreadable ({e}); the episode file is damaged - re-create or drop it") \
            from None
    if not has_images or len(shape) != 3 or min(shape[:2]) <= 0:
        raise DataError(
            f"{where} has no camera images ({npz.name} holds none, image_shape {shape}); this teacher looks at the "
            "images: re-create the dataset with images, or use --teacher sim for simulator datasets"
        )


@dataclass
class _Plan:
    episodes: list[int]
    lengths: dict[int, int]
    digests: dict[int, tuple[str, int]]


def preflight(ds: EpisodeDataset, teacher: Teacher, shard: Shard) -> _Plan:
    """Check every episode of the shard before anything is written; raises DataError / TeacherError."""
    episodes = [e for e in range(len(ds)) if shard.owns(e)]
    lengths: dict[int, int] = {}
    digests: dict[int, tuple[str, int]] = {}
    for e in episodes:
        where = f"{ds.root} episode {e}"
        try:
            info = ds.episode_info(e)
        except ValueError as err:  # JSONDecodeError
            raise DataError(f"{where}: episodes/{e:06d}.json is not valid JSON ({err}); the dataset is damaged") \
                from None
        if teacher.needs_images:
            _check_images(ds, e, info, where)
        teacher.check_episode(info, where)
        episode = ds.load_episode(e, with_images=False)
        lengths[e] = len(episode)
        digests[e] = (episode_digest(episode.actions, episode.instruction), len(episode))
    return _Plan(episodes, lengths, digests)


def _requests(ds: EpisodeDataset, teacher: Teacher, todo: dict[int, list[int]],
              config: AnnotationConfig) -> Iterator[FrameRequest]:
    """Frame requests, loading one episode at a time (images only for teachers that look at them)."""
    for e, frames in todo.items():
        episode = ds.load_episode(e, with_images=teacher.needs_images)
        t = len(episode)
        for f in frames:
            images: tuple[np.ndarray, ...] = ()
            offsets: tuple[int, ...] = ()
            if teacher.needs_images:
                chosen = list(dict.fromkeys(min(f + o, t - 1) for o in config.image_offsets))
                images = tuple(episode.images[i] for i in chosen)
                offsets = tuple(i - f for i in chosen)
            yield FrameRequest(
                episode=e, frame=f, num_frames=t, instruction=episode.instruction, task=episode.task,
                future_actions=episode.actions[f: f + config.future_actions], images=images,
                image_offsets=offsets or (0,), state=episode.states[f] if episode.states is not None else None,
            )


def _execute(requests: Iterator[FrameRequest], teacher: Teacher,
             on_reply: Callable[[FrameRequest, TeacherReply], None]) -> None:
    """Run the teacher over `requests` with at most teacher.concurrency in flight; every finished reply reaches
    `on_reply` (in this thread) even when another request fails or the run is interrupted."""
    if teacher.concurrency <= 1:
        for request in requests:
            on_reply(request, teacher.annotate(request))
        return
    pending: dict[Future, FrameRequest] = {}
    errors: list[BaseException] = []  # the first one is re-raised after the in-flight replies are stored
    pool = ThreadPoolExecutor(max_workers=teacher.concurrency, thread_name_prefix="teacher")
    try:
        _run_in_pool(pool, requests, teacher, on_reply, pending=pending, errors=errors)
    except BaseException as e:  # KeyboardInterrupt while waiting: keep what already finished
        errors.append(e)
        _keep_in_flight(pending, on_reply)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if errors:
        raise errors[0]


def _run_in_pool(pool: ThreadPoolExecutor, requests: Iterator[FrameRequest], teacher: Teacher,
                 on_reply: Callable[[FrameRequest, TeacherReply], None], *, pending: dict[Future, FrameRequest],
                 errors: list[BaseException]) -> None:
    """Keep `pending` topped up to the teacher's concurrency until the requests run out or one fails; hand every
    finished reply to `on_reply` and append failures to `errors`."""
    exhausted = False
    while True:
        while not errors and not exhausted and len(pending) < teacher.concurrency:
            request = next(requests, None)
            if request is None:
                exhausted = True
                break
            pending[pool.submit(teacher.annotate, request)] = request
        if not pending:
            return
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            request = pending.pop(future)
            try:
                reply = future.result()
            except BaseException as e:  # re-raised after the in-flight replies are stored
                errors.append(e)
                continue
            on_reply(request, reply)


def _keep_in_flight(pending: dict[Future, FrameRequest],
                    on_reply: Callable[[FrameRequest, TeacherReply], None]) -> None:
    """After an interruption: cancel what has not started and store the replies of what was already running."""
    for future in list(pending):
        future.cancel()
    for future, request in list(pending.items()):
        if future.cancelled():
            continue
        with contextlib.suppress(BaseException):  # the first error is the one to report
            on_reply(request, future.result())


def annotate_dataset(
    dataset: str | Path,
    teacher: Teacher,
    config: AnnotationConfig,
    *,
    store_path: str | Path | None = None,
    shard: Shard = Shard(),
    retry_failed: bool = False,
    export: bool = True,
    progress: bool | None = None,
    dataset_id: str | None = None,
    log: Callable[[str], None] | None = None,
) -> RunSummary:
    """Annotate the shard's frames of `dataset` with `teacher`, store every reply, and export. See the module doc."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.monotonic()
    ds = open_dataset(dataset)
    plan = preflight(ds, teacher, shard)
    teacher.check()
    store_path = Path(store_path) if store_path is not None else default_store_path(ds.root)
    dataset_id = dataset_id or str(ds.meta.get("name") or ds.root.name)
    key = AnnotationKey(dataset_id, teacher.name, teacher.prompt_hash)
    summary = RunSummary(dataset=str(ds.root), dataset_id=dataset_id, store=str(store_path), teacher=teacher.name,
                         prompt_hash=teacher.prompt_hash, shard=str(shard), episodes=len(plan.episodes),
                         frames=sum(plan.lengths.values()))
    traffic = _HttpTraffic.before(teacher)
    with AnnotationStore(store_path) as store:
        store.check_episodes(dataset_id, plan.digests)
        todo = _schedule(plan, store.statuses(key, plan.episodes), config.every_k, retry_failed, summary)
        bar = _progress_bar(summary, teacher.name, progress)
        try:
            _execute(_requests(ds, teacher, todo, config), teacher, _reply_recorder(store, key, summary, bar))
        except BaseException:
            bar.close()
            summary.elapsed_s = time.monotonic() - started
            log(f"stopped: {summary.done} frame(s) annotated by this run are kept in {store_path}; "
                f"{summary.pending} not reached - rerun the same command to continue")
            raise
        bar.close()
        if export:
            written, covered = export_rationales(ds.root, store, key, episodes=plan.episodes, lengths=plan.lengths,
                                                 every_k=config.every_k)
            summary.exported_rows, summary.frames_with_rationale = written, covered
    traffic.since(teacher, summary)
    summary.elapsed_s = time.monotonic() - started
    return summary


def _schedule(plan: _Plan, status: dict[tuple[int, int], str], every_k: int, retry_failed: bool,
              summary: RunSummary) -> dict[int, list[int]]:
    """Frames 0, k, 2k, ... of each episode that the store does not hold yet (failed ones only with retry_failed),
    counting scheduled, cached and skipped frames into `summary`."""
    todo: dict[int, list[int]] = {}
    for e in plan.episodes:
        for f in range(0, plan.lengths[e], every_k):
            summary.scheduled += 1
            s = status.get((e, f))
            if s == "done":
                summary.cached += 1
            elif s == "failed" and not retry_failed:
                summary.failed_skipped += 1
            else:
                todo.setdefault(e, []).append(f)
    return todo


def _progress_bar(summary: RunSummary, teacher_name: str, progress: bool | None) -> tqdm:
    """Frames asked about, starting at what the store already holds; shown on a terminal unless told otherwise."""
    return tqdm(total=summary.scheduled, initial=summary.cached + summary.failed_skipped, unit="frame",
                desc=f"annotate [{teacher_name}]", dynamic_ncols=True, smoothing=0.1,
                disable=not (sys.stderr.isatty() if progress is None else progress))


def _reply_recorder(store: AnnotationStore, key: AnnotationKey, summary: RunSummary,
                    bar: tqdm) -> Callable[[FrameRequest, TeacherReply], None]:
    """The callback that stores each reply the moment it arrives, counts it and moves the bar."""

    def on_reply(request: FrameRequest, reply: TeacherReply) -> None:
        store.put(key, request.episode, request.frame, reply.rationale, reply=reply.reply, error=reply.error,
                  calls=reply.calls, prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        summary.calls += reply.calls
        summary.prompt_tokens += reply.prompt_tokens
        summary.completion_tokens += reply.completion_tokens
        if reply.ok:
            summary.done += 1
        else:
            summary.failed += 1
            if len(summary.failures) < 5:
                summary.failures.append(f"episode {request.episode} frame {request.frame}: {reply.error}")
        bar.update(1)
        bar.set_postfix(failed=summary.failed + summary.failed_skipped,
                        tokens=summary.prompt_tokens + summary.completion_tokens, refresh=False)

    return on_reply


@dataclass(frozen=True)
class _HttpTraffic:
    """An HTTP teacher's request and retry counters before the run, to report what this run sent."""

    requests: int | None
    retries: Counter[str]

    @classmethod
    def before(cls, teacher: Teacher) -> _HttpTraffic:
        return cls(getattr(teacher, "http_requests", None), Counter(getattr(teacher, "retry_reasons", {})))

    def since(self, teacher: Teacher, summary: RunSummary) -> None:
        if self.requests is not None:  # an HTTP teacher: what this run sent, as the server saw it
            summary.http_requests = teacher.http_requests - self.requests
            summary.retries = dict(Counter(teacher.retry_reasons) - self.retries)


def carried_rationales(store_rationales: dict[tuple[int, int], Rationale], episode: int, length: int,
                       every_k: int) -> list[Rationale | None]:
    """Per-frame rationale of one episode: frame f takes the rationale of frame (f // k) * k, if that one is done."""
    return [store_rationales.get((episode, (f // every_k) * every_k)) for f in range(length)]


def export_rationales(dataset_root: Path, store: AnnotationStore, key: AnnotationKey, *, episodes: list[int],
                      lengths: dict[int, int], every_k: int) -> tuple[int, int]:
    """Join the store's rationales into <dataset>/rationales.jsonl, appending only rows that change.

    Returns (rows written now, frames that have this teacher's rationale after the export). Holds an exclusive lock
    on <dataset>/.rationales.lock so parallel shards append one at a time.
    """
    rationales = store.rationales(key, episodes)
    lock_path = Path(dataset_root) / ".rationales.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ds = EpisodeDataset(dataset_root)  # fresh: another shard may have appended
            existing = ds.rationales()
            rows = []
            covered = 0
            for e in episodes:
                for f, rationale in enumerate(carried_rationales(rationales, e, lengths[e], every_k)):
                    if rationale is None:
                        continue
                    covered += 1
                    if existing.get((e, f)) != rationale:
                        rows.append((e, f, rationale, key.teacher))
            written = 0
            for start in range(0, len(rows), EXPORT_CHUNK_ROWS):
                written += ds.add_rationales(rows[start: start + EXPORT_CHUNK_ROWS])
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return written, covered
