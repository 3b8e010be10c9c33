"""Attention maps: where in the image the model looks when it writes its action tokens (the paper's Figures 1 and 4).

Why: ReFineVLA's claim is that reasoning supervision makes the action tokens attend to task-relevant objects; this
module measures exactly that, for any checkpoint: the attention weights from the positions that *predict* the 7 action
tokens (the <begin_action> position and a1..a6 — the query where each action is decided) to the image-patch positions
(the <image> tokens, row-major on the patch grid), from the language model's eager attention, averaged over heads and
the chosen layers. Each full attention row is a softmax over all earlier positions and sums to 1; the part that lands
on image patches (`image_share`) is at most 1 and the rest goes to the prompt and rationale tokens.

The sequence is the model's own: the action (and, with `with_rationale`, the rationale before it in the
rationale_then_action order) is generated first, then one teacher-forced forward pass returns the attentions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from refinevla_core.model.processor_refinevla import ACTION_DIM, check_image

LayerSpec = str | int | Sequence[int]


class AttentionError(ValueError):
    """The attention map cannot be computed as asked; the message says why and what to ask instead."""


@dataclass
class AttentionMap:
    """Action-token attention over the image patch grid."""

    grid: np.ndarray  # (gh, gw): mean over the 7 action queries of the attention mass on each patch
    per_action: np.ndarray  # (7, gh, gw): the same per action query (dx .. gripper)
    image_share: np.ndarray  # (7,): attention mass on all image patches per query (= per_action[i].sum())
    row_sums: np.ndarray  # (7,): sum of each full attention row (1 up to float error: softmax)
    layers: list[int]  # the language-model layers averaged
    action: np.ndarray  # float32[7], the decoded action the map explains
    rationale_text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def normalized(self) -> np.ndarray:
        """`grid` scaled to sum to 1 over the patches (a distribution over where the actions look)."""
        total = float(self.grid.sum())
        return self.grid / total if total > 0 else np.full_like(self.grid, 1.0 / self.grid.size)

    def heatmap(self, size: tuple[int, int]) -> np.ndarray:
        """The grid scaled to [0, 1] and resized (bilinear) to (height, width)."""
        g = self.grid.astype(np.float32)
        span = float(g.max() - g.min())
        g = (g - g.min()) / span if span > 0 else np.zeros_like(g)
        img = Image.fromarray(g, mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(img), 0.0, 1.0)

    def overlay(self, image: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Any:
        """PIL RGB image: the input with the heatmap blended on top (colormap from matplotlib)."""
        import matplotlib

        check_image(image)
        if not 0.0 <= alpha <= 1.0:
            raise AttentionError(f"alpha must be in [0, 1], got {alpha}")
        heat = self.heatmap(image.shape[:2])
        colored = (matplotlib.colormaps[cmap](heat)[..., :3] * 255.0).astype(np.float32)
        blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colored
        return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8), mode="RGB")

    def save_png(self, path: str | Path, image: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.overlay(image, alpha=alpha, cmap=cmap).save(path, format="PNG")
        return path


def resolve_layers(spec: LayerSpec, num_layers: int) -> list[int]:
    """"last" | "all" | an index | indices (negative count from the top) -> sorted non-negative layer indices."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "last":
            return [num_layers - 1]
        if text == "all":
            return list(range(num_layers))
        try:
            spec = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise AttentionError(f"layers {spec!r}: give 'last', 'all' or indices like '-1' or '0,2,3'") from None
    indices = [spec] if isinstance(spec, int) else list(spec)
    if not indices:
        raise AttentionError("no layers chosen; give 'last', 'all' or indices")
    out = []
    for i in indices:
        if not -num_layers <= int(i) < num_layers:
            raise AttentionError(f"layer {i} does not exist; the language model has {num_layers} layers "
                                 f"(0..{num_layers - 1}, or -1 for the last)")
        out.append(int(i) % num_layers)
    return sorted(set(out))


@contextlib.contextmanager
def _eager(vlm: Any) -> Iterator[None]:
    """The language model's attention implementation switched to eager for the block (weights are only returned
    there), and back afterwards."""
    lm = vlm.model.language_model
    before = lm.config._attn_implementation  # noqa: SLF001 (transformers: no public getter)
    if before != "eager":
        lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            lm.set_attn_implementation(before)


@torch.no_grad()
def action_attention(
    model: Any,
    image: np.ndarray,
    instruction: str,
    *,
    layers: LayerSpec = "last",
    with_rationale: bool = False,
    max_rationale_tokens: int | None = None,
) -> AttentionMap:
    """The attention map of a RefineVLA's action tokens over `image` for `instruction` (see the module docstring).

    `with_rationale` (rationale_then_action models) generates the rationale first, so the map shows the action
    decided after reasoning; otherwise the action is decoded right after the prompt, as in action-only inference.
    """
    check_image(image)
    proc = model.processor
    lay = proc.layout
    order = model.refinevla_config.target_order
    plan = "rationale_then_action" if with_rationale and order == "rationale_then_action" else "action"
    (gen,) = model.generate([image], [instruction], plan=plan, max_rationale_tokens=max_rationale_tokens)
    action_ids = proc.action_token_ids(gen.action_bins)
    suffix = [*gen.rationale_ids, lay.begin_action_id, *action_ids] if plan != "action" else [
        lay.begin_action_id, *action_ids]
    inputs = proc.generation_inputs([image], [instruction], [suffix])
    num_layers = model.vlm.config.text_config.num_hidden_layers
    chosen = resolve_layers(layers, num_layers)
    with _eager(model.vlm):
        out = model(**inputs, output_attentions=True, use_cache=False)
    if not out.attentions or out.attentions[0] is None:
        raise AttentionError("the model returned no attention weights; it needs eager attention in the language model")
    ids = inputs["input_ids"][0]
    length = ids.shape[0]
    queries = torch.arange(length - ACTION_DIM - 1, length - 1)  # <begin_action>, a1..a6 predict a1..a7
    image_cols = (ids == lay.image_token_id).nonzero().flatten()
    side = round(len(image_cols) ** 0.5)
    if side * side != len(image_cols):
        raise AttentionError(f"{len(image_cols)} image tokens do not form a square patch grid")
    stacked = torch.stack([out.attentions[i][0].float().mean(0) for i in chosen])  # (L, Q, K), heads averaged
    rows = stacked.mean(0)[queries.to(stacked.device)]  # (7, K)
    on_image = rows[:, image_cols.to(rows.device)].cpu().numpy()  # (7, N)
    per_action = on_image.reshape(ACTION_DIM, side, side)
    return AttentionMap(
        grid=per_action.mean(0).astype(np.float32),
        per_action=per_action.astype(np.float32),
        image_share=on_image.sum(1).astype(np.float32),
        row_sums=rows.sum(1).cpu().numpy().astype(np.float32),
        layers=chosen,
        action=proc.decode_actions(gen.action_bins),
        rationale_text=proc.decode_text(gen.rationale_ids),
        meta={"plan": plan, "num_layers": num_layers, "heads": int(out.attentions[0].shape[1]),
              "sequence_length": int(length), "rationale_tokens": len(gen.rationale_ids)},
    )
