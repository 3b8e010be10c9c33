"""Episodes and datasets: one frame/episode abstraction, the project's own on-disk format, readers for LeRobot and
ROS 2 bags, and the normalisation statistics that travel with every dataset and checkpoint.

    episode.py           Frame, Episode, DataError: the one in-memory shape every reader produces
    episode_dataset.py   the project's own dataset folder (atomic episode writes, rationales.jsonl)
    stats.py             action normalisation statistics (stats.json)
    images.py            ROS image encodings / compressed images -> RGB, resizing
    source.py            EpisodeSource: what `refinevla convert` needs from a reader
    bag_topics.py        BagTopicsConfig (config/bag_topics.yaml): which bag topics make a frame
    bag_storage.py       rosbags typestore, the recorder's writer, opening (and salvaging) bags
    bag_plan.py          reading a bag, pass 1: pair actions with instruction, gripper, image; plan episodes
    bag_reader.py        reading a bag, pass 2: decode the images, assemble Episodes (BagEpisodeReader)
    lerobot.py           LeRobot v2.x / v3.0 datasets -> Episodes (LeRobotReader)
    convert.py           `refinevla convert`: bags or a LeRobot dataset -> an episode dataset, atomically
"""

from refinevla_core.data.episode import ACTION_DIM, ACTION_NAMES, DataError, Episode, Frame
from refinevla_core.data.episode_dataset import EpisodeDataset

__all__ = ["ACTION_DIM", "ACTION_NAMES", "DataError", "Episode", "EpisodeDataset", "Frame"]
