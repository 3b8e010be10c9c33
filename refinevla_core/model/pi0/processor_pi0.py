"""Observations and targets <-> π0 tensors, in the token layout transformers' PI0Processor uses.

Prefix (what PI0Processor writes): `<image>` x N, `<bos>`, the prompt, "\\n" (the VLM attends bidirectionally
within it). ReFineVLA appends the rationale tokens and `<eos>` after it, causally masked (token_type_ids = 1, as
PaliGemma marks a suffix), so the VLM learns to write the rationale left to right; the action expert attends to the
prefix, plus the rationale in target order rationale_then_action (`dit_attention_mask`).

Actions: the 7-D Bridge action is normalised per dimension with the dataset mean/std (the checkpoint's stats.json),
zero-padded to `max_action_dim`, in chunks of `chunk_size` future actions (steps past the episode end repeat the last
action and are masked out of the loss). The state input is zero (max_state_dim): the policy interface carries no
proprioception. Decoded actions are clipped to the [min, max] seen in the data, so a robot never receives a command
outside what it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.data.episode import DataError
from refinevla_core.data.stats import ActionStats
from refinevla_core.model.backbone import train_offline_tokenizer
from refinevla_core.model.pi0.configuration_pi0 import RefineVLAPi0Config
from refinevla_core.model.processor_refinevla import _water_fill
from refinevla_core.rationale import Rationale, RationaleError, parse_rationale

ACTION_DIM = 7
STD_FLOOR = 1e-4  # a dimension that never varies normalises to 0 instead of dividing by zero


class Pi0ProcessorError(ValueError):
    """Bad input for the π0 processor (the message names it)."""


def build_hf_processor(config: RefineVLAPi0Config, image_size: int = 224, patch_size: int = 14) -> Any:
    """transformers' PI0Processor: offline tokenizer for random presets, PaliGemma's tokenizer for pretrained ones.

    The image processor is SigLIP's PIL one (resize, rescale, normalise to [-1, 1]; PI0ImageProcessor needs
    torchvision, which this environment does not import): identical for square images, PI0ImageProcessor instead
    pads non-square images to keep their aspect ratio.
    """
    from transformers import PI0Processor
    from transformers.models.siglip import SiglipImageProcessorPil

    base = config.base
    if base.source == "random":
        tokenizer = train_offline_tokenizer(base.tokenizer_vocab_size)
        size, tokens = base.vision.image_size, base.vision.num_image_tokens
    else:
        tokenizer = load_tokenizer(base.pretrained, base.tokenizer, base.revision)
        size, tokens = image_size, (image_size // patch_size) ** 2  # the pretrained vision tower's
    images = SiglipImageProcessorPil(size={"height": size, "width": size}, image_seq_length=tokens)
    return PI0Processor(image_processor=images, tokenizer=tokenizer, max_state_dim=config.max_state_dim,
                        chunk_size=config.chunk_size)


def load_tokenizer(folder: str | None, fallback: str, revision: str | None) -> Any:
    """The folder's own tokenizer when it has one, else `fallback` (PaliGemma's, gated: licence + download)."""
    from transformers import AutoTokenizer

    if folder and Path(folder).is_dir() and any((Path(folder) / n).is_file()
                                                for n in ("tokenizer.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        return AutoTokenizer.from_pretrained(fallback, revision=revision)
    except (OSError, ValueError) as e:
        raise Pi0ProcessorError(
            f"cannot load the tokenizer {fallback!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); it is a "
            "gated hub repo: accept the Gemma licence on https://huggingface.co/" + fallback + ", run "
            f"`huggingface-cli login` and `huggingface-cli download {fallback}` (or set base.tokenizer to a local "
            "folder with tokenizer.json)"
        ) from e


class RefineVLAPi0Processor:
    """Builds training batches and inference prefixes for RefineVLAPi0; holds the action statistics."""

    def __init__(self, hf_processor: Any, config: RefineVLAPi0Config, stats: ActionStats | None = None) -> None:
        self.hf_processor = hf_processor
        self.config = config
        self.tokenizer = hf_processor.tokenizer
        self.image_processor = hf_processor.image_processor
        self.image_token_id = int(hf_processor.image_token_id)
        self.num_image_tokens = int(hf_processor.image_seq_length)
        tok = self.tokenizer
        self.bos_id, self.eos_id = int(tok.bos_token_id), int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
        self.stats: ActionStats | None = None
        if stats is not None:
            self.set_action_stats(stats)

    # ---- actions ----------------------------------------------------------------------------------------------
    def set_action_stats(self, stats: ActionStats) -> None:
        self.stats = stats

    def _require_stats(self) -> ActionStats:
        if self.stats is None:
            raise DataError("the π0 processor has no action statistics; call set_action_stats(stats) (a checkpoint "
                            "stores them in stats.json)")
        return self.stats

    def normalize_actions(self, actions: np.ndarray) -> torch.Tensor:
        """(..., 7) Bridge actions -> (..., max_action_dim) float32, mean/std-normalised and zero-padded."""
        stats = self._require_stats()
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape[-1] != ACTION_DIM or not np.isfinite(actions).all():
            raise Pi0ProcessorError(f"actions must be finite with {ACTION_DIM} values per step, got {actions.shape}")
        norm = (actions - stats.mean) / np.maximum(stats.std, STD_FLOOR)
        pad = [(0, 0)] * (norm.ndim - 1) + [(0, self.config.max_action_dim - ACTION_DIM)]
        return torch.from_numpy(np.pad(norm, pad).astype(np.float32))

    def decode_actions(self, normalized: np.ndarray | torch.Tensor) -> np.ndarray:
        """(..., max_action_dim) model output -> (..., 7) Bridge actions, clipped to the data's [min, max]."""
        stats = self._require_stats()
        values = np.asarray(torch.as_tensor(normalized).detach().float().cpu().numpy())[..., :ACTION_DIM]
        actions = values * np.maximum(stats.std, STD_FLOOR) + stats.mean
        actions = np.where(np.isfinite(actions), actions, stats.mean)  # never pass NaN on; clipped below anyway
        return np.clip(actions, stats.min, stats.max).astype(np.float32)

    # ---- text -------------------------------------------------------------------------------------------------
    def prefix_ids(self, instruction: str) -> list[int]:
        text = self.config.prompt(instruction) + "\n"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [self.image_token_id] * self.num_image_tokens + [self.bos_id, *ids]

    def rationale_ids(self, rationale: Rationale | str | None) -> list[int]:
        """The rationale's canonical text + <eos> within max_rationale_tokens ([] for None). Over the budget every
        section is shortened (longest first) and none dropped, as the PaliGemma family's processor does."""
        if rationale is None or (isinstance(rationale, str) and not rationale.strip()):
            return []
        budget = self.config.max_rationale_tokens - 1  # <eos> closes the rationale
        if isinstance(rationale, str):
            try:
                rationale = parse_rationale(rationale)
            except RationaleError:  # free text: plain truncation
                return [*self._encode(rationale)[:budget], self.eos_id]
        ids = self._encode(rationale.text())
        if len(ids) > budget:
            lines = [self._encode(line) for line in rationale.text().split("\n")]
            newline = self._encode("\n")
            keep = _water_fill([len(line) for line in lines], budget - len(newline) * (len(lines) - 1))
            ids = []
            for i, (line, n) in enumerate(zip(lines, keep, strict=True)):
                ids += ([*newline] if i else []) + line[:n]
        return [*ids[:budget], self.eos_id]

    def rationale_fits(self, rationale: Rationale | str | None) -> bool:
        """Whether the whole rationale fits max_rationale_tokens with its <eos> (no section shortened)."""
        if rationale is None:
            return True
        text = rationale.text() if isinstance(rationale, Rationale) else str(rationale)
        return len(self._encode(text)) < self.config.max_rationale_tokens

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ---- images -----------------------------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 1 camera, 3, H, W) float32 from HxWx3 uint8 images."""
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise Pi0ProcessorError(f"image {i} must be an HxWx3 uint8 array, got "
                                        f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}")
        pixels = self.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return pixels.unsqueeze(1)

    # ---- batches ----------------------------------------------------------------------------------------------
    def training_batch(self, images: Sequence[np.ndarray], instructions: Sequence[str], chunks: np.ndarray,
                       chunk_is_pad: np.ndarray, rationales: Sequence[Rationale | str | None]) -> dict[str, Any]:
        """Right-padded rows [prefix | rationale <eos> | pad] with the masks the joint loss needs."""
        n = len(images)
        if not (len(instructions) == len(rationales) == len(chunks) == n):
            raise Pi0ProcessorError("images, instructions, rationales and action chunks must have the same length")
        rows = [(self.prefix_ids(ins), self.rationale_ids(r)) for ins, r in zip(instructions, rationales, strict=True)]
        length = max(len(p) + len(r) for p, r in rows)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        token_type_ids = torch.ones((n, length), dtype=torch.long)
        rationale_mask = torch.zeros((n, length), dtype=torch.bool)
        dit_attention_mask = torch.zeros((n, length), dtype=torch.long)
        cot = self.config.target_order == "rationale_then_action"
        for b, (prefix, rat) in enumerate(rows):
            p, r = len(prefix), len(rat)
            input_ids[b, : p + r] = torch.tensor(prefix + rat)
            attention_mask[b, : p + r] = 1
            token_type_ids[b, :p] = 0
            rationale_mask[b, p : p + r] = True
            dit_attention_mask[b, : p + r if cot else p] = 1
        return {
            "input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
            "pixel_values": self.pixel_values(images), "pixel_attention_mask": torch.ones((n, 1), dtype=torch.bool),
            "rationale_mask": rationale_mask, "dit_attention_mask": dit_attention_mask,
            "state": torch.zeros((n, self.config.max_state_dim)),
            "actions": self.normalize_actions(np.asarray(chunks)),
            "action_is_pad": torch.as_tensor(np.asarray(chunk_is_pad, dtype=bool)),
        }

    def inference_prefix(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded prefixes (generation appends on the right; positions come from the attention mask)."""
        if len(images) != len(instructions):
            raise Pi0ProcessorError(f"{len(images)} images but {len(instructions)} instructions")
        prefixes = [self.prefix_ids(ins) for ins in instructions]
        length = max(len(p) for p in prefixes)
        input_ids = torch.full((len(prefixes), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, p in enumerate(prefixes):
            input_ids[b, length - len(p) :] = torch.tensor(p)
            attention_mask[b, length - len(p) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": self.pixel_values(images),
                "pixel_attention_mask": torch.ones((len(prefixes), 1), dtype=torch.bool),
                "state": torch.zeros((len(prefixes), self.config.max_state_dim))}

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        self.hf_processor.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: RefineVLAPi0Config,
                        stats: ActionStats | None = None) -> RefineVLAPi0Processor:
        from transformers import AutoTokenizer, PI0Processor
        from transformers.models.siglip import SiglipImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        images = SiglipImageProcessorPil.from_pretrained(str(directory), local_files_only=True)
        hf = PI0Processor(image_processor=images, tokenizer=tokenizer, max_state_dim=config.max_state_dim,
                          chunk_size=config.chunk_size)
        return cls(hf, config, stats)
