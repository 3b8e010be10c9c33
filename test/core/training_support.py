"""Shared by the training tests: a tiny real transformers PaliGemma (Gemma2 text + SigLIP vision) and batches for it.

Built exactly like the project's presets (../shared/notes/vla-offline.md §1) but smaller, so a training step takes
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
