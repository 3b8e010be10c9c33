"""RefineVLA: the vision-language-action model — an HF PaliGemmaForConditionalGeneration that writes a rationale and
7 action tokens, with constrained decoding so every generated action parses.

Why a thin wrapper and not a new architecture: the network is exactly PaliGemma / PaliGemma2 (SigLIP + Gemma2), so
checkpoints stay loadable by plain transformers, peft/accelerate work unchanged, and a pretrained PaliGemma2 base
(SpatialVLA's) drops in. What ReFineVLA adds lives around it:
  - `forward(**batch)` returns the HF output (logits over the full sequence); `token_losses` is the reference
    cross-entropy split into action / rationale / format positions (the trainer's L = L_action + λ·L_rationale);
  - `generate` decodes with a grammar (a LogitsProcessor): rationale text may not contain action tokens, the 7 action
    positions may only be action tokens, and the format markers are fed, never sampled — so the output always parses,
    even from an untrained model. It uses transformers' generate with its KV cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from refinevla_core.data.episode import DataError
from refinevla_core.data.stats import STATS_FILENAME, ActionStats
from refinevla_core.model.backbone import base_unavailable_message, build_processor, paligemma_config
from refinevla_core.model.checkpoint_format import CheckpointError, Verify, verify_checkpoint
from refinevla_core.model.checkpoint_refinevla import save_refinevla_checkpoint
from refinevla_core.model.configuration_refinevla import REFINEVLA_CONFIG_NAME, RefineVLAConfig
from refinevla_core.model.processor_refinevla import ACTION_DIM, IGNORE_INDEX, ProcessorError, RefineVLAProcessor
from refinevla_core.rationale import RationaleError, parse_rationale

Plan = Literal["action", "rationale_then_action", "action_then_rationale"]
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "position_ids")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """The model and its tokenizer/processor/config do not fit together; the message names the mismatch."""


@dataclass
class Generated:
    """One row of a `generate` call."""

    action_bins: np.ndarray  # int64[7]
    rationale_ids: list[int] = field(default_factory=list)
    rationale_complete: bool = False  # ended by the model's own terminator (not cut at max_rationale_tokens)
    preprocess_s: float = 0.0  # image + prompt -> tensors
    action_ready_s: float = 0.0  # seconds from the start of the call until the 7 action tokens were known
    generate_s: float = 0.0  # seconds in transformers' generate
    new_tokens: int = 0


class ActionGrammar:
    """LogitsProcessor + StoppingCriteria enforcing the ReFineVLA token grammar per row.

    Plans (what the prompt ends with -> what is generated):
      - "action":                 ... <begin_action>      -> a1..a7
      - "rationale_then_action":  ... prompt "\\n"         -> text (no action ids, no <eos>) up to max tokens, then
                                                            <begin_action> (the model's or forced), a1..a7
      - "action_then_rationale":  ... <begin_action>      -> a1..a7, <begin_rationale> (forced), text up to <eos>
                                                            or max tokens (then <eos> is forced)
    The model may end its rationale (<begin_action> / <eos>) only once the text holds all four sections: a small
    model otherwise often stops mid-sentence and acts on half a thought. Within the token budget it still decides
    what to write and when to stop; at the budget the end is forced whatever the text (then it may not parse).
    """

    def __init__(self, processor: RefineVLAProcessor, plan: Plan, prompt_length: int, max_rationale_tokens: int,
                 vocab_size: int) -> None:
        self.lay = processor.layout
        self.plan = plan
        self.prompt_length = prompt_length
        self.max_rationale = max_rationale_tokens
        self.t0 = time.perf_counter()
        self.action_ready: dict[int, float] = {}
        lay = self.lay
        free = torch.ones(vocab_size, dtype=torch.bool)
        free[lay.vocab_len :] = False  # embedding rows beyond the tokenizer are not text
        free[lay.action_token_start : lay.action_token_end] = False
        for tid in (lay.image_token_id, lay.pad_id, lay.bos_id, lay.begin_action_id, lay.begin_rationale_id):
            free[tid] = False
        free[lay.eos_id] = False
        self.text_only = free  # rationale text: no markers, no end
        self.text_or_end = free.clone()  # ... or the model ends its own reasoning (once it has four sections)
        self.text_or_end[lay.begin_action_id if plan == "rationale_then_action" else lay.eos_id] = True
        self.decode_text = processor.decode_text
        self.action_only = torch.zeros(vocab_size, dtype=torch.bool)
        self.action_only[lay.action_token_start : lay.action_token_end] = True

    # state of one row from its generated tokens: ("free", rationale ids so far) | ("force", id) | ("action", None)
    # | ("done", None). Whether a free row may end is decided in __call__ only: stop() needs no parse.
    def _state(self, gen: list[int]) -> tuple[str, Any]:
        if self.plan == "action":
            return ("action", None) if len(gen) < ACTION_DIM else ("done", None)
        if self.plan == "rationale_then_action":
            return self._state_rationale_first(gen)
        return self._state_action_first(gen)

    def _state_rationale_first(self, gen: list[int]) -> tuple[str, Any]:
        lay, n = self.lay, len(gen)
        if lay.begin_action_id not in gen:
            return ("force", lay.begin_action_id) if n >= self.max_rationale else ("free", gen)
        k = n - gen.index(lay.begin_action_id) - 1
        return ("action", None) if k < ACTION_DIM else ("done", None)

    def _state_action_first(self, gen: list[int]) -> tuple[str, Any]:
        lay, n = self.lay, len(gen)
        if n < ACTION_DIM:
            return ("action", None)
        if n == ACTION_DIM:
            return ("force", lay.begin_rationale_id)
        if lay.eos_id in gen[ACTION_DIM + 1 :]:
            return ("done", None)
        if n - ACTION_DIM - 1 >= self.max_rationale:
            return ("force", lay.eos_id)
        return ("free", gen[ACTION_DIM + 1 :])

    def _has_four_sections(self, rationale_ids: list[int]) -> bool:
        try:
            parse_rationale(self.decode_text(rationale_ids))
        except RationaleError:
            return False
        return True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        now = time.perf_counter()
        allowed = torch.ones_like(scores, dtype=torch.bool)
        for row in range(input_ids.shape[0]):
            gen = input_ids[row, self.prompt_length :].tolist()
            state, arg = self._state(gen)
            if self._actions_known(gen) and row not in self.action_ready:
                self.action_ready[row] = now - self.t0
            if state == "free":
                allowed[row] = (self.text_or_end if self._has_four_sections(arg) else self.text_only).to(scores.device)
            elif state == "force":
                allowed[row] = False
                allowed[row, arg] = True
            elif state == "action":
                allowed[row] = self.action_only.to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

    def _actions_known(self, gen: list[int]) -> bool:
        if self.plan == "rationale_then_action":
            return self.lay.begin_action_id in gen and len(gen) - gen.index(self.lay.begin_action_id) - 1 >= ACTION_DIM
        return len(gen) >= ACTION_DIM

    def stop(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """Per-row done flags (a StoppingCriteria): no forward pass is spent after a row's last needed token."""
        done = [self._state(input_ids[r, self.prompt_length :].tolist())[0] == "done" for r in range(len(input_ids))]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def parse(self, gen: list[int]) -> Generated:
        lay = self.lay
        if self.plan == "rationale_then_action":
            i = gen.index(lay.begin_action_id)
            acts, rationale, complete = gen[i + 1 : i + 1 + ACTION_DIM], gen[:i], i < self.max_rationale
            used = i + 1 + ACTION_DIM
        elif self.plan == "action_then_rationale":
            acts, rest = gen[:ACTION_DIM], gen[ACTION_DIM + 1 :]
            end = rest.index(lay.eos_id) if lay.eos_id in rest else len(rest)
            rationale, complete = rest[:end], lay.eos_id in rest and end < self.max_rationale
            used = ACTION_DIM + 1 + min(end + 1, len(rest))
        else:
            acts, rationale, complete, used = gen[:ACTION_DIM], [], False, ACTION_DIM
        bins = np.asarray(acts, dtype=np.int64) - lay.action_token_start
        if len(bins) != ACTION_DIM or bins.min() < 0 or bins.max() >= lay.n_action_bins:
            raise ModelError(f"generation ended before 7 action tokens were produced (got ids {acts})")
        return Generated(action_bins=bins, rationale_ids=[int(t) for t in rationale], rationale_complete=complete,
                         new_tokens=used)


def _stopping_criteria(grammar: ActionGrammar) -> Any:
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            return grammar.stop(input_ids)

    return _Stop()


def token_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean token cross-entropy over the action, rationale and format positions of a `training_batch`.

    Position t of `labels`/masks is predicted by logits[:, t - 1] (the causal shift is done here). A group with no
    positions in the batch gives 0 (still attached to the graph). Returns {"action", "rationale", "format",
    "action_accuracy"}; the trainer combines them as L = action + λ · rationale (+ format, which is tiny).
    """
    labels = batch["labels"][:, 1:].to(logits.device)
    logp_logits = logits[:, :-1].float()
    safe = labels.clamp(min=0)
    nll = torch.nn.functional.cross_entropy(logp_logits.transpose(1, 2), safe, reduction="none")
    out: dict[str, torch.Tensor] = {}
    for group in ("action", "rationale", "format"):
        mask = batch[f"{group}_mask"][:, 1:].to(logits.device) & (labels != IGNORE_INDEX)
        count = mask.sum()
        out[group] = (nll * mask).sum() / count.clamp(min=1)
    act = batch["action_mask"][:, 1:].to(logits.device)
    correct = (logp_logits.argmax(-1) == labels) & act
    out["action_accuracy"] = correct.sum().float() / act.sum().clamp(min=1)
    return out


class RefineVLA(torch.nn.Module):
    """The ReFineVLA model: `vlm` (HF PaliGemmaForConditionalGeneration), `processor`, `config`, `stats`."""

    def __init__(self, vlm: Any, processor: RefineVLAProcessor, config: RefineVLAConfig,
                 stats: ActionStats | None = None) -> None:
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.refinevla_config = config
        processor.config = config  # one config object: target order / rationale length changes reach the processor
        if stats is not None:
            processor.set_action_stats(stats)
        check_model_fits_processor(vlm, processor, config)

    @property
    def stats(self) -> ActionStats | None:
        return getattr(self.processor, "stats", None)

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vlm.parameters()).dtype

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: RefineVLAConfig, seed: int = 0) -> RefineVLA:
        """A model for `config`: random init (offline tokenizer) or the pretrained base with the new tokens added."""
        from transformers import PaliGemmaForConditionalGeneration


        processor = RefineVLAProcessor(build_processor(config), config)
        lay = processor.layout
        base = config.base
        if base.source == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vlm = PaliGemmaForConditionalGeneration(paligemma_config(config, lay.vocab_len, lay.image_token_id))
            vlm = vlm.to(DTYPES[config.dtype])
        else:
            try:
                vlm = PaliGemmaForConditionalGeneration.from_pretrained(
                    base.pretrained, revision=base.revision, use_safetensors=True, dtype=DTYPES[config.dtype],
                    attn_implementation=config.attn_implementation, trust_remote_code=base.trust_remote_code,
                )
            except (OSError, ValueError) as e:
                raise ModelError(base_unavailable_message(base.pretrained, e)) from e
            if vlm.get_input_embeddings().num_embeddings < lay.vocab_len:
                vlm.resize_token_embeddings(lay.vocab_len, pad_to_multiple_of=64)
        if hasattr(vlm, "set_attn_implementation") and config.attn_implementation == "eager":
            vlm.model.language_model.set_attn_implementation("eager")
        vlm.eval()
        config = RefineVLAConfig.from_dict({**config.to_dict(), "tokens": None})
        config.tokens = lay
        return cls(vlm, processor, config)

    # ---- training ---------------------------------------------------------------------------------------------
    def forward(self, **batch: Any) -> Any:
        """The HF forward on a `processor.training_batch` (mask keys are ignored): `.logits` is (B, T, V)."""
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
        extra = {k: v for k, v in batch.items() if k in ("output_attentions", "output_hidden_states", "use_cache")}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        return self.vlm(**inputs, **extra)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.vlm.parameters())

    # ---- inference --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        images: Sequence[np.ndarray],
        instructions: Sequence[str],
        *,
        plan: Plan = "action",
        fed_rationales: Sequence[Sequence[int]] | None = None,
        max_rationale_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        streamer: Any = None,
    ) -> list[Generated]:
        """Generate per row according to `plan` (see ActionGrammar); `fed_rationales` (rationale_then_action +
        plan "action") are token ids fed before <begin_action> — a cached rationale reused as a forced prefix.
        `streamer` (transformers' BaseStreamer API: put(ids), end()) sees each new token as it is decoded (the
        policy's streaming and async rationale modes)."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        order = self.refinevla_config.target_order
        if plan not in ("action", order):
            raise ModelError(f"plan {plan!r} does not match this model's target order {order!r}")
        if fed_rationales is not None and order != "rationale_then_action":
            raise ModelError("a fed rationale only makes sense for target order rationale_then_action")
        t_start = time.perf_counter()
        lay = self.processor.layout
        n = len(images)
        if plan == "rationale_then_action":
            fed: list[list[int]] = [[] for _ in range(n)]
        elif order == "rationale_then_action" and fed_rationales is not None:
            fed = [[*r, lay.begin_action_id] for r in fed_rationales]
        else:
            fed = [[lay.begin_action_id] for _ in range(n)]
        inputs = self.processor.generation_inputs(images, instructions, fed)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        preprocess_s = time.perf_counter() - t_start
        max_r = int(max_rationale_tokens or self.refinevla_config.max_rationale_tokens)
        prompt_length = inputs["input_ids"].shape[1]
        vocab = self.vlm.get_output_embeddings().weight.shape[0]
        grammar = ActionGrammar(self.processor, plan, prompt_length, max_r, vocab)
        max_new = {"action": ACTION_DIM, "rationale_then_action": max_r + 1 + ACTION_DIM,
                   "action_then_rationale": ACTION_DIM + 1 + max_r + 1}[plan]
        gen_config = GenerationConfig(
            max_new_tokens=max_new, do_sample=do_sample, temperature=temperature if do_sample else None,
            top_k=None, top_p=None, num_beams=1, use_cache=True,
            eos_token_id=lay.eos_id, pad_token_id=lay.pad_id, bos_token_id=lay.bos_id,
        )
        out = self.vlm.generate(
            **inputs, generation_config=gen_config, logits_processor=LogitsProcessorList([grammar]),
            stopping_criteria=StoppingCriteriaList([_stopping_criteria(grammar)]), streamer=streamer,
        )
        generate_s = time.perf_counter() - grammar.t0
        results = []
        for row in range(n):
            gen = out[row, prompt_length:].tolist()
            result = grammar.parse(gen)
            result.preprocess_s, result.generate_s = preprocess_s, generate_s
            result.action_ready_s = preprocess_s + grammar.action_ready.get(row, generate_s)
            results.append(result)
        return results

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: Any, extra_files: dict[str, Any] | None = None) -> Any:
        """A checkpoint folder (refinevla_core.model.checkpoint) of this model, its processor and statistics."""
        if self.stats is None:
            raise ModelError("the model has no action statistics; set them with processor.set_action_stats(stats)")
        return save_refinevla_checkpoint(directory, self.vlm, self.processor, self.stats, self.refinevla_config,
                                         extra_files)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        verify: Verify = "auto",
        attn_implementation: str | None = None,
    ) -> RefineVLA:
        """Load a RefineVLA (model, processor, config, statistics) from a folder written by save_pretrained /
        save_checkpoint: the manifest is verified first, then that tokenizer, weights and token layout agree."""
        from transformers import PaliGemmaForConditionalGeneration

        directory = Path(directory)
        verify_checkpoint(directory, verify)
        try:
            config = RefineVLAConfig.from_dict(json.loads((directory / REFINEVLA_CONFIG_NAME).read_text()),
                                               where=str(directory / REFINEVLA_CONFIG_NAME))
        except (OSError, json.JSONDecodeError, ValueError) as e:
            raise CheckpointError(f"{directory / REFINEVLA_CONFIG_NAME} is unreadable ({e})") from e
        try:
            stats = ActionStats.load(directory / STATS_FILENAME)
        except DataError as e:
            raise CheckpointError(f"checkpoint {directory}: {e}") from e
        hf_config = json.loads((directory / "config.json").read_text())
        if hf_config.get("model_type") != "paligemma":
            raise CheckpointError(
                f"{directory} holds a {hf_config.get('model_type')!r} model, not a ReFineVLA (PaliGemma) checkpoint; "
                "SpatialVLA/OpenVLA checkpoints load through refinevla_core.model.adapters with trust_remote_code=True"
            )
        try:
            processor = RefineVLAProcessor.from_pretrained(directory, config, stats)
        except (OSError, ValueError, ProcessorError) as e:
            raise CheckpointError(f"the tokenizer/processor files of {directory} are unusable ({e})") from e
        torch_dtype = DTYPES[dtype or config.dtype]
        try:
            vlm, info = PaliGemmaForConditionalGeneration.from_pretrained(
                str(directory), use_safetensors=True, dtype=torch_dtype, local_files_only=True,
                attn_implementation=attn_implementation or config.attn_implementation, output_loading_info=True,
            )
        except Exception as e:  # safetensors/torch raise many types for damaged or mismatched weights
            raise CheckpointError(
                f"the weights in {directory} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                "they are damaged or not safetensors — copy the checkpoint again or re-save it with save_checkpoint"
            ) from e
        missing = [k for k in info.get("missing_keys", []) if not k.startswith("lm_head")]
        if missing or info.get("mismatched_keys"):
            raise CheckpointError(
                f"the weights in {directory} do not fit config.json: missing {missing[:5]}, mismatched "
                f"{list(info.get('mismatched_keys', []))[:5]}; the weights and config come from different models"
            )
        vlm.eval().to(device)
        try:
            return cls(vlm, processor, config, stats)
        except ModelError as e:
            raise CheckpointError(f"checkpoint {directory}: {e}") from e


def check_model_fits_processor(vlm: Any, processor: RefineVLAProcessor, config: RefineVLAConfig) -> None:
    """Tokenizer/model/config consistency; ModelError naming every mismatch."""
    lay = processor.layout
    problems = []
    rows = vlm.get_input_embeddings().num_embeddings
    if rows < lay.vocab_len:
        problems.append(f"the tokenizer has {lay.vocab_len} tokens but the model's embedding only {rows} rows")
    image_id = getattr(vlm.config, "image_token_id", getattr(vlm.config, "image_token_index", None))
    if image_id != lay.image_token_id:
        problems.append(f"image token id: model {image_id} vs tokenizer {lay.image_token_id}")
    model_tokens = getattr(vlm.config.vision_config, "image_size", 0) // max(
        getattr(vlm.config.vision_config, "patch_size", 1), 1)
    if model_tokens**2 != lay.num_image_tokens:
        problems.append(f"image tokens: the vision tower makes {model_tokens**2}, the processor feeds "
                        f"{lay.num_image_tokens}")
    if config.tokens is not None:
        problems += [f"token layout {m}" for m in config.tokens.mismatches(lay)]
    if problems:
        raise ModelError("tokenizer/model mismatch: " + "; ".join(problems)
                         + " — the tokenizer files and the weights come from different checkpoints")
