"""Linear probe behind docs/demo.md "What limits success": do a checkpoint's image features (the projector's output,
what the language layers see) hold the cube's position and the cube-minus-gripper offset? Ridge regression from the
flattened features of the first 2/3 of a collected dataset's episodes, R² on the last 1/6 (the best of three
ridge strengths). `random` probes a freshly built tiny preset: the control.

    python benchmarks/probe_image_features.py <dataset> <checkpoint folder | random> [...]
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from refinevla_core.data.episode_dataset import EpisodeDataset
from refinevla_core.model.modeling_refinevla import RefineVLA
from refinevla_core.model.presets import build_from_preset

TARGETS = ("cube x", "cube y", "offset x", "offset y", "offset z")


def frames(dataset: EpisodeDataset, episodes: range) -> tuple[np.ndarray, np.ndarray]:
    """Images and (cube xy, cube - gripper xyz) of every frame of `episodes`, from the privileged states."""
    images, targets = [], []
    for e in episodes:
        ep = dataset.load_episode(e)
        for image, state in zip(ep.images, ep.states, strict=True):
            cube = np.asarray(state["objects"]["cube"]["position"])
            gripper = np.asarray(state["gripper"]["position"])
            images.append(image)
            targets.append(np.r_[cube[:2], cube - gripper])
    return np.stack(images), np.stack(targets)


def features(model: RefineVLA, images: np.ndarray) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            pixels = model.processor.pixel_values(list(images[i : i + 64]))
            projected = model.vlm.model.get_image_features(pixel_values=pixels)
            projected = getattr(projected, "pooler_output", projected)
            out.append(projected.reshape(len(pixels), -1).float().numpy())
    return np.concatenate(out)


def ridge_r2(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], lam: float) -> np.ndarray:
    mu, sd = train[0].mean(0), train[0].std(0) + 1e-6
    a, b = (train[0] - mu) / sd, (test[0] - mu) / sd
    y_mean = train[1].mean(0)
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (train[1] - y_mean))
    residual = ((b @ w + y_mean - test[1]) ** 2).sum(0)
    return 1.0 - residual / ((test[1] - test[1].mean(0)) ** 2).sum(0)


def main() -> None:
    torch.set_num_threads(1)
    dataset = EpisodeDataset(sys.argv[1])
    n = len(dataset)
    train, test = frames(dataset, range(2 * n // 3)), frames(dataset, range(5 * n // 6, n))
    print(f"{len(train[0])} training frames, {len(test[0])} test frames; R² per target: {', '.join(TARGETS)}")
    for name in sys.argv[2:]:
        model = build_from_preset("tiny") if name == "random" else RefineVLA.from_pretrained(name)
        x_train, x_test = features(model.eval(), train[0]), features(model, test[0])
        best = max((ridge_r2((x_train, train[1]), (x_test, test[1]), lam) for lam in (1e2, 1e3, 1e4)),
                   key=lambda r: r.mean())
        print(f"{name}: " + "  ".join(f"{t} {r:.3f}" for t, r in zip(TARGETS, best, strict=True)))


if __name__ == "__main__":
    main()
