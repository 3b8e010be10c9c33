"""Selective transfer: decide which parameters of a PaliGemma-style VLA train, and say so in a table at start.

ReFineVLA freezes the vision tower and the lower language layers and trains the upper "reasoning" layers. Here:
the vision tower, the projector (configurable), the token embeddings and the lower K language layers are frozen
(K a count, a fraction, or a layer-name regex; see FreezeConfig).

The tied-embedding pitfall: PaliGemma ties the output head to the input
embedding, so freezing the embeddings also freezes the head rows of the newly added action tokens, which start random
and would never learn. Making the whole embedding trainable fixes that but sends gradients down through every frozen
layer (the embedding output feeds layer 0), which costs as much activation memory as full fine-tuning. The default
fix ("head" mode) gives the action tokens their own trainable output rows, `TrainableRowsHead`: logits of those
tokens come from the new rows, every other logit from the frozen (still tied) matrix, and nothing below the first
trainable layer needs a gradient. When the checkpoint is written, `export_for_saving` folds the rows into an untied
output head (config tie_word_embeddings = false), so the saved model is a plain transformers model that computes
exactly what was trained. "tied" mode keeps the tie with one row shared by input embedding and head (and pays the
full backward pass); "none" leaves the rows frozen.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional

from refinevla_core.config import ConfigError
from refinevla_core.training.config import FreezeConfig

VISION_NAMES = ("vision_tower", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector",)
ACTION_EXPERT_NAMES = ("dit",)  # π0's action expert: a Gemma stack next to the language model, not it


# ---- finding the parts of the model ----------------------------------------------------------------------------------
@dataclass
class ModelParts:
    """Where the pieces of a PaliGemma-style model are, by qualified module name."""

    vision: str | None
    projector: str | None
    language_model: str  # the decoder stack holding embed_tokens, layers and norm
    layers: list[str]  # qualified names of the decoder layers, bottom to top
    embeddings: str  # qualified name of the input embedding module
    head: str | None  # qualified name of the output head (lm_head)


def _shortest(names: list[str]) -> str | None:
    return min(names, key=lambda n: (n.count("."), len(n))) if names else None


def find_parts(model: nn.Module) -> ModelParts:
    """Locate vision tower, projector, language model layers, embeddings and head by their transformers names."""
    modules = dict(model.named_modules())
    vision = _shortest([n for n in modules if n.rsplit(".", 1)[-1] in VISION_NAMES])
    projector = _shortest([n for n in modules if n.rsplit(".", 1)[-1] in PROJECTOR_NAMES])
    candidates = [
        n for n, m in modules.items()
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "embed_tokens")
        and not (vision and n.startswith(vision)) and n.rsplit(".", 1)[-1] not in ACTION_EXPERT_NAMES
    ]
    language_model = _shortest(candidates)
    if language_model is None:
        raise ConfigError(
            f"{type(model).__name__} has no language model with `embed_tokens` and `layers`; selective transfer "
            "supports PaliGemma-style models (refinevla_core.model presets)"
        )
    lm = modules[language_model]
    prefix = f"{language_model}." if language_model else ""
    layers = [f"{prefix}layers.{i}" for i in range(len(lm.layers))]
    embeddings = f"{prefix}embed_tokens"
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        head = next((n for n, m in modules.items() if m is out), None)
    return ModelParts(vision, projector, language_model, layers, embeddings, head)


# ---- K: which language layers are frozen -----------------------------------------------------------------------------
def resolve_frozen_layers(spec: int | float | str, layer_names: Sequence[str]) -> list[int]:
    """Indices of the layers to freeze for a count, a fraction ("75%" or 0.75) or a name regex."""
    n = len(layer_names)
    if isinstance(spec, bool):
        raise ConfigError(f"freeze.language_layers: {spec!r} is not a count, fraction or regex")
    if isinstance(spec, int):
        if spec > n:
            raise ConfigError(
                f"freeze.language_layers = {spec} but the language model has only {n} layers; "
                f"use a count in 0..{n}, a fraction like 0.75, or a layer-name regex"
            )
        return list(range(spec))
    if isinstance(spec, float):
        return list(range(round(spec * n)))
    text = spec.strip()
    if text.endswith("%"):
        return list(range(round(float(text[:-1]) / 100.0 * n)))
    pattern = re.compile(text)
    hits = [i for i, name in enumerate(layer_names) if pattern.search(name)]
    if not hits:
        examples = ", ".join(layer_names[:2]) + (f", ... {layer_names[-1]}" if n > 2 else "")
        raise ConfigError(
            f"freeze.language_layers regex {text!r} matches none of the {n} language layers ({examples})"
        )
    return hits


# ---- trainable rows for the new (action) tokens ----------------------------------------------------------------------
class TrainableRowsHead(nn.Module):
    """An output head whose rows for `row_ids` come from a separate trainable parameter; all others from the frozen
    `base` head (which may stay tied to the frozen input embedding). Gradients reach only the new rows and the
    hidden state feeding the head."""

    def __init__(self, base: nn.Linear, row_ids: Sequence[int], rows: nn.Parameter | None = None) -> None:
        super().__init__()
        self.base = base
        ids = torch.as_tensor(list(row_ids), dtype=torch.long, device=base.weight.device)
        self.register_buffer("row_ids", ids, persistent=False)
        if rows is None:
            rows = nn.Parameter(base.weight.detach()[ids].clone())
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:  # what `get_output_embeddings().weight` readers expect
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden)
        new = functional.linear(hidden, self.rows.to(hidden.dtype))
        return logits.index_copy(-1, self.row_ids, new.to(logits.dtype))

    def merged_weight(self) -> torch.Tensor:
        """The full (vocab, hidden) head matrix this module computes, as a new tensor."""
        weight = self.base.weight.detach().clone()
        weight[self.row_ids] = self.rows.detach().to(weight.dtype)
        return weight


class TrainableRowsEmbedding(nn.Module):
    """An input embedding whose rows for `row_ids` come from a trainable parameter (shared with the head in "tied"
    mode); every other token uses the frozen `base` embedding, including its scale (Gemma multiplies by √hidden)."""

    def __init__(self, base: nn.Embedding, row_ids: Sequence[int], rows: nn.Parameter) -> None:
        super().__init__()
        self.base = base
        ids = torch.as_tensor(list(row_ids), dtype=torch.long, device=base.weight.device)
        lookup = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=base.weight.device)
        lookup[ids] = torch.arange(len(ids), device=base.weight.device)
        self.register_buffer("row_ids", ids, persistent=False)
        self.register_buffer("lookup", lookup, persistent=False)
        self.rows = rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        local = self.lookup[input_ids]
        is_new = local >= 0
        if not bool(is_new.any()):
            return out + 0.0 * self.rows.sum().to(out.dtype)  # keep the rows in the graph (DDP wants every param)
        scale = getattr(self.base, "embed_scale", None)
        new = functional.embedding(local.clamp(min=0), self.rows).to(out.dtype)
        if scale is not None:
            new = new * scale.to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


# ---- applying the freeze ---------------------------------------------------------------------------------------------
@dataclass
class FreezeReport:
    """What trains and what does not; `table()` is printed at the start of a run."""

    rows: list[tuple[str, int, int]] = field(default_factory=list)  # (group, trainable, frozen)
    frozen_layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    new_token_rows: str = "none"
    num_new_tokens: int = 0

    @property
    def trainable(self) -> int:
        return sum(t for _, t, _ in self.rows)

    @property
    def frozen(self) -> int:
        return sum(f for _, _, f in self.rows)

    def table(self) -> str:
        total = self.trainable + self.frozen
        width = max([len(g) for g, _, _ in self.rows] + [len("parameter group")])
        lines = [f"{'parameter group':<{width}}  {'trainable':>13}  {'frozen':>13}", "-" * (width + 30)]
        for group, t, f in self.rows:
            lines.append(f"{group:<{width}}  {t:>13,}  {f:>13,}")
        lines.append("-" * (width + 30))
        share = 100.0 * self.trainable / total if total else 0.0
        lines.append(f"{'total':<{width}}  {self.trainable:>13,}  {self.frozen:>13,}   ({share:.1f}% trainable)")
        lines.append(
            f"language layers frozen: {_ranges(self.frozen_layers) or 'none'} of {self.num_layers}; "
            f"new-token rows: {self.new_token_rows} ({self.num_new_tokens} tokens)"
        )
        return "\n".join(lines)


def _ranges(indices: Sequence[int]) -> str:
    out: list[str] = []
    for i in sorted(indices):
        if out and i == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        else:
            out.append(str(i))
    return ", ".join(out)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_selective_transfer(
    model: nn.Module, config: FreezeConfig, new_token_ids: Sequence[int] = ()
) -> FreezeReport:
    """Freeze in place per `config`; wrap head/embedding for the new-token rows. Returns the report.

    `embeddings` freezes both token matrices: the input embedding and the output head, tied (PaliGemma) or untied
    (a checkpoint saved in "head" mode); the new-token rows then learn through TrainableRowsHead.
    """
    parts = find_parts(model)
    frozen_layers = resolve_frozen_layers(config.language_layers, parts.layers)
    model.requires_grad_(True)
    if config.vision and parts.vision is not None:
        model.get_submodule(parts.vision).requires_grad_(False)
    if config.projector and parts.projector is not None:
        model.get_submodule(parts.projector).requires_grad_(False)
    embedding = model.get_submodule(parts.embeddings)
    head = model.get_submodule(parts.head) if parts.head else None
    if config.embeddings:  # the token matrices: input embedding and output head (tied or not)
        embedding.requires_grad_(False)
        if head is not None:
            head.requires_grad_(False)
    for i in frozen_layers:
        model.get_submodule(parts.layers[i]).requires_grad_(False)

    mode = config.new_token_rows if (config.embeddings and new_token_ids) else "none"
    if new_token_ids:
        vocab = embedding.weight.shape[0]
        bad = [i for i in new_token_ids if not 0 <= int(i) < vocab]
        if bad:
            raise ConfigError(f"new token ids {bad[:5]} are outside the embedding's {vocab} rows")
    if mode != "none":
        if head is None or not isinstance(head, nn.Linear):
            raise ConfigError(
                f"freeze.new_token_rows = {mode!r} needs an nn.Linear output head; this model has "
                f"{type(head).__name__ if head is not None else 'none'}; set freeze.new_token_rows = none"
            )
        wrapped = TrainableRowsHead(head, new_token_ids)
        _set_module(model, parts.head, wrapped)
        if mode == "tied":
            _set_module(model, parts.embeddings, TrainableRowsEmbedding(embedding, new_token_ids, wrapped.rows))
    report = describe(model, parts, frozen_layers)
    report.new_token_rows = mode
    report.num_new_tokens = len(new_token_ids) if mode != "none" else 0
    return report


def describe(model: nn.Module, parts: ModelParts | None = None, frozen_layers: Sequence[int] = ()) -> FreezeReport:
    """Group every parameter (shared ones once) into the report's rows: vision, projector, embeddings, language
    layers (contiguous runs with the same frozen/trainable split), final norm, head, new-token rows, LoRA, other."""
    parts = parts or find_parts(_unwrap_peft(model))
    layer_index = {name: i for i, name in enumerate(parts.layers)}
    groups: dict[str, list[int]] = {}
    per_layer: dict[int, list[int]] = {}
    seen: set[int] = set()
    for raw_name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        name = _strip_peft_prefix(raw_name)
        group = _group_of(name, parts, layer_index)
        slot = 0 if p.requires_grad else 1
        if isinstance(group, int):
            per_layer.setdefault(group, [0, 0])[slot] += p.numel()
        else:
            groups.setdefault(group, [0, 0])[slot] += p.numel()
    rows: list[tuple[str, int, int]] = []
    order = ["vision tower", "projector", "embeddings"]
    for g in order:
        if g in groups:
            rows.append((g, *groups.pop(g)))
    run_start = None
    last_key = None
    indices = sorted(per_layer)
    for pos, i in enumerate(indices):
        key = (per_layer[i][0] > 0, per_layer[i][1] > 0)
        if run_start is None:
            run_start, last_key = i, key
        nxt = indices[pos + 1] if pos + 1 < len(indices) else None
        nkey = (per_layer[nxt][0] > 0, per_layer[nxt][1] > 0) if nxt is not None else None
        if nkey != last_key:
            span = [per_layer[j] for j in range(run_start, i + 1)]
            label = f"language layer {run_start}" if run_start == i else f"language layers {run_start}-{i}"
            rows.append((label, sum(s[0] for s in span), sum(s[1] for s in span)))
            run_start, last_key = (nxt, nkey) if nxt is not None else (None, None)
    for g in ["language final norm", "output head", "new-token rows", "LoRA adapters"]:
        if g in groups:
            rows.append((g, *groups.pop(g)))
    rows += [(g, t, f) for g, (t, f) in sorted(groups.items())]
    return FreezeReport(rows=rows, frozen_layers=list(frozen_layers), num_layers=len(parts.layers))


def _strip_peft_prefix(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _group_of(name: str, parts: ModelParts, layer_index: dict[str, int]) -> str | int:
    named = _named_group(name, parts)
    if named is not None:
        return named
    m = re.match(r"(.*\.layers\.\d+)\.", name)
    if m and m.group(1) in layer_index:
        return layer_index[m.group(1)]
    lm_prefix = f"{parts.language_model}." if parts.language_model else ""
    if name.startswith(lm_prefix):
        return "language final norm"
    return "other"


def _named_group(name: str, parts: ModelParts) -> str | None:
    """The report group of a parameter outside the numbered language layers, or None."""
    if "lora_" in name:
        return "LoRA adapters"
    if name.endswith(".rows") or name == "rows":
        return "new-token rows"
    prefixes = (("vision tower", parts.vision), ("projector", parts.projector), ("embeddings", parts.embeddings),
                ("output head", parts.head))
    for group, prefix in prefixes:
        if prefix and name.startswith(prefix + "."):
            return group
    return None


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# ---- LoRA on the unfrozen part ---------------------------------------------------------------------------------------
def lora_target_regex(parts: ModelParts, trainable_layers: Sequence[int], module_names: Sequence[str]) -> str:
    """The explicit peft target regex for the trainable language layers only (vla-offline.md §3: peft's
    layers_to_transform + layers_pattern would also hit the SigLIP encoder layers of the same index)."""
    if not trainable_layers:
        raise ConfigError("lora.enabled but every language layer is frozen: lower freeze.language_layers")
    layer_prefixes = "|".join(re.escape(parts.layers[i]) for i in trainable_layers)
    modules = "|".join(re.escape(m) for m in module_names)
    return rf"(?:{layer_prefixes})\.(?:.*\.)?(?:{modules})"


def apply_lora(model: nn.Module, report: FreezeReport, *, r: int, alpha: int, dropout: float,
               module_names: Sequence[str]) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on the trainable language layers; the new-token rows keep training."""
    from peft import LoraConfig, get_peft_model

    parts = find_parts(model)
    trainable_layers = [i for i in range(len(parts.layers)) if i not in set(report.frozen_layers)]
    regex = lora_target_regex(parts, trainable_layers, module_names)
    keep = [name for name, p in model.named_parameters() if p.requires_grad and name.endswith(".rows")]
    with warnings.catch_warnings():  # peft reads transformers' renamed `is_gradient_checkpointing`: not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=regex, bias="none"))
    hit = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    if not hit:
        raise ConfigError(f"lora.target_modules {list(module_names)} match no module of the trainable layers")
    for name, p in peft_model.named_parameters():
        if _strip_peft_prefix(name) in keep:
            p.requires_grad_(True)
    return peft_model


# ---- saving ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def export_for_saving(model: nn.Module) -> Iterator[nn.Module]:
    """Yield a plain transformers model computing what `model` computes, for save_pretrained / save_checkpoint.

    Without LoRA this swaps the row wrappers for plain modules in place and restores them afterwards, bit-exactly
    (no copy of the model). With LoRA it merges the adapters into a deep copy, so the training model is untouched
    (an in-place merge/unmerge would not restore the base weights bit-exactly).
    """
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config"):
        merged = copy.deepcopy(model).merge_and_unload()
        _fold_rows(merged)
        yield merged
        return
    restore = _fold_rows(model)
    try:
        yield model
    finally:
        restore()


def _fold_rows(model: nn.Module) -> Callable[[], None]:
    """Replace row wrappers by plain modules holding the merged rows; return a function undoing it."""
    undo: list[Callable[[], None]] = []
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, (TrainableRowsHead, TrainableRowsEmbedding))]
    embed_wrappers = [(n, m) for n, m in wrappers if isinstance(m, TrainableRowsEmbedding)]
    head_wrappers = [(n, m) for n, m in wrappers if isinstance(m, TrainableRowsHead)]
    for name, wrapper in embed_wrappers:  # "tied" mode: write the rows into the (shared) embedding matrix
        weight = wrapper.base.weight
        saved = weight.detach()[wrapper.row_ids].clone()
        with torch.no_grad():
            weight[wrapper.row_ids] = wrapper.rows.detach().to(weight.dtype)
        _set_module(model, name, wrapper.base)

        def _undo_embed(name=name, wrapper=wrapper, saved=saved) -> None:
            with torch.no_grad():
                wrapper.base.weight[wrapper.row_ids] = saved
            _set_module(model, name, wrapper)

        undo.append(_undo_embed)
    for name, wrapper in head_wrappers:
        if any(wrapper.base.weight is ew.base.weight for _, ew in embed_wrappers):
            _set_module(model, name, wrapper.base)  # tied: the embedding now holds the rows for both

            def _undo_tied_head(name=name, wrapper=wrapper) -> None:
                _set_module(model, name, wrapper)

            undo.append(_undo_tied_head)
            continue
        base = wrapper.base
        plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(wrapper.merged_weight())
            if base.bias is not None:
                plain.bias.copy_(base.bias)
        _set_module(model, name, plain)
        flags = _untie(model)

        def _undo_head(name=name, wrapper=wrapper, flags=flags) -> None:
            _set_module(model, name, wrapper)
            _retie_flags(model, flags)

        undo.append(_undo_head)

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    out = [config]
    text = getattr(config, "text_config", None)
    if text is not None:
        out.append(text)
    return out


def _untie(model: nn.Module) -> list[tuple[object, bool]]:
    flags = []
    for cfg in _configs(model):
        if hasattr(cfg, "tie_word_embeddings"):
            flags.append((cfg, cfg.tie_word_embeddings))
            cfg.tie_word_embeddings = False
    return flags


def _retie_flags(model: nn.Module, flags: list[tuple[object, bool]]) -> None:
    del model
    for cfg, value in flags:
        cfg.tie_word_embeddings = value


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of every trainable parameter (what changes during training)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
