"""EpisodeSource: what `refinevla convert` needs from a reader of recorded episodes, so a new source format (another
bag layout, a new dataset format) plugs in by implementing three members instead of editing the converter.

Implemented by BagEpisodeReader (one ROS 2 bag, refinevla_core.data.bag_reader) and LeRobotReader (one LeRobot
dataset, refinevla_core.data.lerobot).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from refinevla_core.data.episode import Episode


class SourceReport(Protocol):
    """What a reader read, kept, skipped and why; stored in the converted dataset's meta.json."""

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class EpisodeSource(Protocol):
    """A reader of one source of recorded episodes; its settings (topics, keys, drop_bad_frames) are given when it is
    made, and `report` fills while source_episodes() runs."""

    @property
    def report(self) -> SourceReport: ...

    def expected_episodes(self) -> int | None:
        """How many source episodes source_episodes() yields (a progress bar's total); None: unknown until read."""
        ...

    def source_episodes(self) -> Iterator[list[Episode]]:
        """Per source episode, in order, the validated Episodes it became: usually one; several where a LeRobot
        episode's task changes; none where all of it was dropped (counted in the report)."""
        ...
