"""Episodes and datasets: one frame/episode abstraction, the project's own on-disk format, readers for LeRobot and
ROS 2 bags, and the normalisation statistics that travel with every dataset and checkpoint."""

from refinevla_core.data.episode import ACTION_DIM, ACTION_NAMES, DataError, Episode, Frame
from refinevla_core.data.episode_dataset import EpisodeDataset

__all__ = ["ACTION_DIM", "ACTION_NAMES", "DataError", "Episode", "EpisodeDataset", "Frame"]
