"""RefineVLAProcessor: images + instructions (+ training targets) -> PaliGemma inputs, labels and loss masks.

Why: the trainer's joint loss L = L_action + λ·L_rationale needs to know which target positions are action tokens and
which are rationale tokens, and inference must feed exactly the token layout training used. Both are built here, in
one place, from the HF PaliGemmaProcessor's image preprocessing and tokenizer.

Sequence layout (PaliGemma convention: prefix bidirectional, token_type_ids 0; suffix causal, token_type_ids 1):

    prefix:  <image> x N  <bos>  prompt "\\n"
    suffix, rationale_then_action:  [rationale tokens  <begin_action>]  a1 .. a7  <eos>
    suffix, action_then_rationale:  <begin_action>  a1 .. a7  [<begin_rationale>  rationale tokens  <eos>]  | <eos>

(brackets: present only when the sample has a rationale; in rationale_then_action a sample without one starts its
suffix at <begin_action>.)

Loss masks (aligned with `input_ids`/`labels`: position t holds the token predicted from position t - 1):
  - `action_mask`: the 7 action tokens.
  - `rationale_mask`: the rationale tokens plus the token that ends the rationale (<begin_action> in
    rationale_then_action — the model must learn when to stop reasoning; <eos> in action_then_rationale).
  - `format_mask`: the <eos> that ends an action-only target.
Format markers the Policy always *feeds* (<begin_action> where it opens the suffix, <begin_rationale>) carry label
-100: they are never generated. This fixes the "format text" bug
(an unsupervised "Action: " that free generation replaced with action tokens): no position the Policy generates is
left without a loss, and no position without a loss is ever generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from refinevla_core.data.episode import DataError
from refinevla_core.data.stats import ActionStats
from refinevla_core.model.configuration_refinevla import (
    ACTION_TOKEN_FORMAT,
    BEGIN_ACTION_TOKEN,
    BEGIN_RATIONALE_TOKEN,
    RefineVLAConfig,
    TokenLayout,
)
from refinevla_core.model.tokenizer import ActionTokenizer
from refinevla_core.rationale import Rationale, RationaleError, parse_rationale

IGNORE_INDEX = -100
ACTION_DIM = 7


class ProcessorError(ValueError):
    """Inputs the processor cannot turn into model inputs; the message names the input and the fix."""


def check_image(image: Any, where: str = "image") -> np.ndarray:
    """An HxWx3 uint8 RGB array, or ProcessorError naming what was given and what is expected."""
    if not isinstance(image, np.ndarray):
        raise ProcessorError(f"{where} must be a numpy array HxWx3 uint8 RGB, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ProcessorError(
            f"{where} must have shape (H, W, 3) RGB; got {image.shape} (convert grayscale/RGBA/BGR to RGB first)"
        )
    if image.dtype != np.uint8:
        raise ProcessorError(f"{where} must be uint8 0..255, got {image.dtype} (scale float images by 255 first)")
    if min(image.shape[:2]) < 2:
        raise ProcessorError(f"{where} is {image.shape[0]}x{image.shape[1]} pixels; that is not a camera image")
    return image


def add_refinevla_tokens(tokenizer: Any, n_action_bins: int) -> None:
    """Add <act_000>..<act_{n-1}>, <begin_action>, <begin_rationale> (contiguous, in that order) if not present."""
    names = [ACTION_TOKEN_FORMAT.format(i) for i in range(n_action_bins)] + [BEGIN_ACTION_TOKEN, BEGIN_RATIONALE_TOKEN]
    missing = [n for n in names if n not in tokenizer.get_vocab()]
    if missing and len(missing) != len(names):
        raise ProcessorError(
            f"the tokenizer has {len(names) - len(missing)} of the {len(names)} ReFineVLA tokens; it was built for "
            "another action-bin count — start from the base tokenizer"
        )
    if missing:
        tokenizer.add_tokens(names, special_tokens=True)


def token_layout(tokenizer: Any, num_image_tokens: int, n_action_bins: int) -> TokenLayout:
    """Read the ReFineVLA token ids off a tokenizer (ProcessorError when they are missing or not contiguous)."""
    vocab = tokenizer.get_vocab()

    def tid(name: str) -> int:
        if name not in vocab:
            raise ProcessorError(f"the tokenizer has no {name!r} token; it is not a ReFineVLA tokenizer")
        return int(vocab[name])

    start = tid(ACTION_TOKEN_FORMAT.format(0))
    ids = [tid(ACTION_TOKEN_FORMAT.format(i)) for i in range(n_action_bins)]
    if ids != list(range(start, start + n_action_bins)):
        raise ProcessorError(
            "the action tokens are not contiguous in the tokenizer; rebuild it with add_refinevla_tokens"
        )
    return TokenLayout(
        vocab_len=len(tokenizer), image_token_id=tid("<image>"), num_image_tokens=int(num_image_tokens),
        bos_id=int(tokenizer.bos_token_id), eos_id=int(tokenizer.eos_token_id), pad_id=int(tokenizer.pad_token_id),
        action_token_start=start, n_action_bins=n_action_bins,
        begin_action_id=tid(BEGIN_ACTION_TOKEN), begin_rationale_id=tid(BEGIN_RATIONALE_TOKEN),
    )


def _water_fill(lengths: Sequence[int], budget: int) -> list[int]:
    """Per-item lengths min(length, cap) with the largest cap whose total fits `budget` (at least 1 each): the
    longest items are cut first, short ones stay whole."""
    cap = max(lengths, default=0)
    while cap > 1 and sum(min(n, cap) for n in lengths) > budget:
        cap -= 1
    return [min(n, cap) for n in lengths]


@dataclass
class Target:
    """One training target: the 7 action bins and the rationale token ids (empty: no rationale for this sample)."""

    action_bins: np.ndarray  # int64[7]
    rationale_ids: list[int]


class RefineVLAProcessor:
    """Wraps an HF PaliGemmaProcessor (image preprocessing + tokenizer) with the ReFineVLA token layout."""

    def __init__(self, hf_processor: Any, config: RefineVLAConfig, stats: ActionStats | None = None) -> None:
        self.hf_processor = hf_processor
        self.tokenizer = hf_processor.tokenizer
        self.image_processor = hf_processor.image_processor
        self.config = config
        add_refinevla_tokens(self.tokenizer, config.n_action_bins)
        self.layout = token_layout(self.tokenizer, hf_processor.image_seq_length, config.n_action_bins)
        self.action_tokenizer: ActionTokenizer | None = None
        if stats is not None:
            self.set_action_stats(stats)

    # ---- statistics -------------------------------------------------------------------------------------------
    def set_action_stats(self, stats: ActionStats) -> None:
        """The statistics that map continuous actions to bins (and back); they travel with the checkpoint."""
        self.stats = stats
        self.action_tokenizer = ActionTokenizer.from_stats(stats, n_bins=self.config.n_action_bins)

    def _require_tokenizer(self) -> ActionTokenizer:
        if self.action_tokenizer is None:
            raise DataError(
                "the processor has no action statistics; call processor.set_action_stats(stats) with "
                "refinevla_core.data.stats.compute_dataset_stats(<dataset>) (a checkpoint stores them in stats.json)"
            )
        return self.action_tokenizer

    # ---- pieces -----------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> tuple[int, int]:
        size = self.image_processor.size
        return int(size["height"]), int(size["width"])

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        for i, image in enumerate(images):
            check_image(image, where=f"image {i}" if len(images) > 1 else "image")
        out = self.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"]

    def prefix_ids(self, instruction: str) -> list[int]:
        if not isinstance(instruction, str) or not instruction.strip():
            raise ProcessorError("the instruction is empty; give the task in words, e.g. 'put the spoon in the cup'")
        text_ids = self.tokenizer.encode(self.config.prompt(instruction) + "\n", add_special_tokens=False)
        return [self.layout.image_token_id] * self.layout.num_image_tokens + [self.layout.bos_id] + text_ids

    def rationale_ids(self, rationale: Rationale | str | None) -> list[int]:
        """Token ids of a rationale's canonical text within max_rationale_tokens (empty for None).

        Over the budget, every section is shortened (longest first) and none is dropped, so a model trained on it
        still learns to write all four sections; `rationale_fits` says whether a text needed that."""
        if rationale is None:
            return []
        if isinstance(rationale, str):
            if not rationale.strip():
                return []
            try:
                rationale = parse_rationale(rationale)
            except RationaleError:  # free text: plain truncation
                return self.tokenizer.encode(rationale, add_special_tokens=False)[: self.config.max_rationale_tokens]
        budget = self.config.max_rationale_tokens
        ids = self.tokenizer.encode(rationale.text(), add_special_tokens=False)
        if len(ids) <= budget:
            return ids
        lines = [self.tokenizer.encode(line, add_special_tokens=False) for line in rationale.text().split("\n")]
        newline = self.tokenizer.encode("\n", add_special_tokens=False)
        keep = _water_fill([len(line) for line in lines], budget - len(newline) * (len(lines) - 1))
        out: list[int] = []
        for i, (line, n) in enumerate(zip(lines, keep, strict=True)):
            out += ([*newline] if i else []) + line[:n]
        return out[:budget]

    def rationale_fits(self, rationale: Rationale | str | None) -> bool:
        """Whether the whole rationale fits max_rationale_tokens (no section shortened)."""
        if rationale is None:
            return True
        text = rationale.text() if isinstance(rationale, Rationale) else str(rationale)
        return len(self.tokenizer.encode(text, add_special_tokens=False)) <= self.config.max_rationale_tokens

    def action_token_ids(self, bins: np.ndarray) -> list[int]:
        return [self.layout.action_token_start + int(b) for b in np.asarray(bins).reshape(-1)]

    def is_action_token(self, token_id: int) -> bool:
        return self.layout.action_token_start <= token_id < self.layout.action_token_end

    def action_ids_to_bins(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(i) for i in ids]
        if len(ids) != ACTION_DIM or not all(self.is_action_token(i) for i in ids):
            raise DataError(f"expected {ACTION_DIM} action tokens, got ids {ids}")
        return np.asarray(ids, dtype=np.int64) - self.layout.action_token_start

    def decode_actions(self, bins: np.ndarray) -> np.ndarray:
        """Bins -> un-normalised actions (float32, Bridge convention) with the checkpoint's statistics."""
        return self._require_tokenizer().decode(bins)

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # ---- suffixes ---------------------------------------------------------------------------------------------
    def suffix(self, target: Target) -> tuple[list[int], list[str]]:
        """Suffix ids and, per id, its role: 'action' | 'rationale' | 'format' (supervised) | 'fed' (label -100)."""
        lay = self.layout
        acts = self.action_token_ids(target.action_bins)
        rat = list(target.rationale_ids)
        if self.config.target_order == "rationale_then_action":
            if rat:
                ids = [*rat, lay.begin_action_id, *acts, lay.eos_id]
                roles = ["rationale"] * (len(rat) + 1) + ["action"] * ACTION_DIM + ["format"]
            else:
                ids = [lay.begin_action_id, *acts, lay.eos_id]
                roles = ["fed"] + ["action"] * ACTION_DIM + ["format"]
        elif rat:
            ids = [lay.begin_action_id, *acts, lay.begin_rationale_id, *rat, lay.eos_id]
            roles = ["fed"] + ["action"] * ACTION_DIM + ["fed"] + ["rationale"] * (len(rat) + 1)
        else:
            ids = [lay.begin_action_id, *acts, lay.eos_id]
            roles = ["fed"] + ["action"] * ACTION_DIM + ["format"]
        return ids, roles

    # ---- batches ----------------------------------------------------------------------------------------------
    def training_batch(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        actions: np.ndarray,
        rationales: Sequence[Rationale | str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Right-padded teacher-forcing batch: input_ids, attention_mask, token_type_ids, pixel_values, labels,
        action_mask, rationale_mask, format_mask (bool), has_rationale (bool per sample).

        `actions` are continuous (B, 7), Bridge convention; they are binned with the processor's statistics.
        """
        n = len(images)
        if len(instructions) != n:
            raise ProcessorError(f"{n} images but {len(instructions)} instructions")
        actions = np.asarray(actions)
        if actions.shape != (n, ACTION_DIM):
            raise DataError(f"actions must have shape ({n}, {ACTION_DIM}); got {actions.shape}")
        rationales = list(rationales) if rationales is not None else [None] * n
        if len(rationales) != n:
            raise ProcessorError(f"{n} images but {len(rationales)} rationales (use None for a frame without one)")
        bins = self._require_tokenizer().encode(actions)
        rows, has_rationale = [], []
        for i in range(n):
            prefix = self.prefix_ids(instructions[i])
            rationale = self.rationale_ids(rationales[i])
            ids, roles = self.suffix(Target(bins[i], rationale))
            rows.append((prefix, ids, roles))
            has_rationale.append(bool(rationale))
        length = max(len(p) + len(s) for p, s, _ in rows)
        input_ids = torch.full((n, length), self.layout.pad_id, dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        token_type = torch.zeros((n, length), dtype=torch.long)
        masks = {k: torch.zeros((n, length), dtype=torch.bool) for k in ("action", "rationale", "format")}
        for i, (prefix, ids, roles) in enumerate(rows):
            p, s = len(prefix), len(ids)
            input_ids[i, : p + s] = torch.tensor(prefix + ids)
            attention[i, : p + s] = 1
            token_type[i, p : p + s] = 1
            for j, role in enumerate(roles):
                if role != "fed":
                    labels[i, p + j] = ids[j]
                    masks[role][i, p + j] = True
        return {
            "input_ids": input_ids, "attention_mask": attention, "token_type_ids": token_type,
            "pixel_values": self.pixel_values(images), "labels": labels,
            "action_mask": masks["action"], "rationale_mask": masks["rationale"], "format_mask": masks["format"],
            "has_rationale": torch.tensor(has_rationale),
        }

    def generation_inputs(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        fed_suffixes: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Left-padded prompts for `generate`: prefix + an optional fed suffix start per row (token_type_ids 1),
        e.g. [<begin_action>] or [cached rationale ids..., <begin_action>]."""
        n = len(images)
        if len(instructions) != n:
            raise ProcessorError(f"{n} images but {len(instructions)} instructions")
        fed_suffixes = list(fed_suffixes) if fed_suffixes is not None else [[] for _ in range(n)]
        rows = [(self.prefix_ids(instructions[i]), list(fed_suffixes[i])) for i in range(n)]
        length = max(len(p) + len(s) for p, s in rows)
        input_ids = torch.full((n, length), self.layout.pad_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        token_type = torch.zeros((n, length), dtype=torch.long)
        for i, (prefix, fed) in enumerate(rows):
            start = length - len(prefix) - len(fed)
            input_ids[i, start:] = torch.tensor(prefix + fed)
            attention[i, start:] = 1
            token_type[i, start + len(prefix) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": token_type,
                "pixel_values": self.pixel_values(images)}

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Tokenizer + image processor files (HF format, loadable with AutoProcessor)."""
        self.hf_processor.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: str | Path, config: RefineVLAConfig,
                        stats: ActionStats | None = None) -> RefineVLAProcessor:
        from transformers import PaliGemmaProcessor

        hf = PaliGemmaProcessor.from_pretrained(str(directory), local_files_only=True)
        return cls(hf, config, stats)
