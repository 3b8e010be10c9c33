"""Shared by the training tests: a tiny real transformers PaliGemma (Gemma2 text + SigLIP vision) and batches for it.

Built exactly like the project's presets (refinevla_core/model/presets.py) but smaller, so a training step takes
milliseconds; the trainer tests use the model engineer's tiny preset instead.
"""

from __future__ import annotations

import torch

VOCAB = 300
IMAGE_TOKEN = VOCAB - 1
NEW_TOKENS = list(range(VOCAB - 1 - 16, VOCAB - 1))  # 16 "action" tokens just below the image token
IMAGE_SIZE = 28
PATCH = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def tiny_paligemma(num_layers: int = 4, seed: int = 0):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        text_config={
            "model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": num_layers,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": VOCAB,
        },
        vision_config={
            "model_type": "siglip_vision_model", "vision_use_head": False, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH,
            "projection_dim": 32,
        },
        image_token_index=IMAGE_TOKEN, projection_dim=32,
    )
    return PaliGemmaForConditionalGeneration(config).eval()


def tiny_batch(batch: int = 4, prompt: int = 5, rationale: int = 6, actions: int = 3, seed: int = 0) -> dict:
    """input_ids = image tokens, prompt, rationale, action tokens; labels/masks in input indexing."""
    g = torch.Generator().manual_seed(seed)
    n_img = NUM_IMAGE_TOKENS
    length = n_img + prompt + rationale + actions
    ids = torch.randint(4, NEW_TOKENS[0], (batch, length), generator=g)
    ids[:, :n_img] = IMAGE_TOKEN
    act_start = n_img + prompt + rationale
    ids[:, act_start:] = torch.tensor(NEW_TOKENS)[torch.randint(0, len(NEW_TOKENS), (batch, actions), generator=g)]
    labels = ids.clone()
    labels[:, : n_img + prompt] = -100
    rationale_mask = torch.zeros_like(ids, dtype=torch.bool)
    rationale_mask[:, n_img + prompt : act_start] = True
    action_mask = torch.zeros_like(ids, dtype=torch.bool)
    action_mask[:, act_start:] = True
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, n_img + prompt :] = 1
    return {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": token_type_ids,
        "pixel_values": torch.rand((batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=g),
        "labels": labels, "action_mask": action_mask, "rationale_mask": rationale_mask,
    }


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def make_dataset(root, episodes: int = 4, length: int = 6, *, rationales: bool = True, stats: bool = True,
                 seed: int = 0, image_size: tuple[int, int] = (64, 80)):
    """A small EpisodeDataset with random images and actions, a rationale on every frame, and stats.json.

    The action is a function of the episode's cube position (drawn into the image) so a model can learn it."""
    import numpy as np

    from refinevla_core.data.episode import Episode
    from refinevla_core.data.episode_dataset import EpisodeDataset
    from refinevla_core.data.stats import compute_dataset_stats
    from refinevla_core.rationale import Rationale

    rng = np.random.default_rng(seed)
    ds = EpisodeDataset.create(root, name="unit")
    h, w = image_size
    for e in range(episodes):
        images = rng.integers(0, 60, (length, h, w, 3), dtype=np.uint8)
        side = e % 2  # cube on the left or right half
        images[:, h // 3 : h // 3 + 12, (w // 2) * side + 4 : (w // 2) * side + 16, 0] = 255
        actions = rng.normal(0.0, 0.01, (length, 7)).astype(np.float32)
        actions[:, 1] += 0.02 if side == 0 else -0.02
        actions[:, 6] = (np.arange(length) < length // 2).astype(np.float32)
        where = "left" if side == 0 else "right"
        rats = [
            Rationale(f"a red cube on the {where}", f"step {t} of the push", f"the cube is {where} of the gripper",
                      f"move {where}, then close the gripper")
            for t in range(length)
        ] if rationales else None
        ds.append(Episode(images=images, actions=actions, instruction="push the red cube", task="unit",
                          rationales=rats))
    if stats:
        compute_dataset_stats(ds)
    return ds


# float32 rounding (reduction order across processes) is ~1e-7 of an update; a distribution bug is O(1) of it
UPDATE_RTOL = 1e-3


def updates(initial: dict[str, torch.Tensor], checkpoint) -> dict[str, torch.Tensor]:
    """Final minus initial weights of a run (the checkpoint folder it wrote)."""
    from refinevla_core.model.checkpoint import load_checkpoint

    final = load_checkpoint(checkpoint).vlm.state_dict()
    return {k: final[k].float() - initial[k].float() for k in initial}


def assert_same_updates(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    """Two runs' SGD updates agree to UPDATE_RTOL of the largest one (see test_fsdp.py for why SGD)."""
    largest = max(float(d.abs().max()) for d in one.values())
    assert largest > 1e-3, "the runs must move the weights for the comparison to mean anything"
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert worst <= UPDATE_RTOL * largest, f"updates differ by {worst:.3g}; largest update {largest:.3g}"
