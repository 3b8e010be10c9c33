"""RefineVLAPi0: transformers' PI0ForConditionalGeneration trained with the ReFineVLA joint loss, and its inference.

Joint loss  L = L_flow + λ_r · CE(rationale tokens):
  - L_flow is π0's flow-matching loss (noise ~ N(0, I), t ~ Beta(1.5, 1) scaled as PI0Config says,
    x_t = t·noise + (1 − t)·actions, target velocity noise − actions), averaged over the 7 real action dimensions and
    the chunk steps inside the episode (padding dimensions and steps past the end carry no loss);
  - the CE is over the rationale tokens, with logits from the VLM's last hidden states times its (tied) token
    embedding matrix: PaliGemma's LM head, which PI0 does not instantiate.
One VLM pass gives both: its hidden states (rationale logits) and its key/value cache, which the action expert
attends to (`dit_attention_mask` says which prefix positions it sees), exactly as PI0's own forward does.

Inference: one VLM pass over image + prompt; then (target order rationale_then_action) the rationale is decoded
greedily into the same KV cache, and the chunk is sampled with `num_inference_steps` Euler steps of the expert over
that cache; with action_then_rationale the chunk is sampled first and the rationale decoded after it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from refinevla_core.data.episode import DataError
from refinevla_core.data.stats import STATS_FILENAME, ActionStats
from refinevla_core.model.checkpoint_format import CheckpointError, Verify, verify_checkpoint
from refinevla_core.model.pi0 import training_pi0
from refinevla_core.model.pi0.checkpoint_pi0 import save_pi0_checkpoint
from refinevla_core.model.pi0.configuration_pi0 import PI0_CONFIG_NAME, RefineVLAPi0Config
from refinevla_core.model.pi0.processor_pi0 import ACTION_DIM, RefineVLAPi0Processor, build_hf_processor
from refinevla_core.training.loss import JointLoss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Pi0ModelError(ValueError):
    """The π0 model cannot be built or loaded; the message names the fix."""


@dataclass
class Pi0Output:
    """What `forward` returns: the trainer backpropagates `joint_loss.total`."""

    joint_loss: JointLoss
    velocity: torch.Tensor  # (B, chunk, max_action_dim) predicted velocity
    rationale_logits: torch.Tensor | None = None  # (n rationale positions, vocab)
    logits: None = None  # the PaliGemma family's token logits; π0 has none


@dataclass
class Pi0Generated:
    """One row of `generate`: the normalised chunk and the rationale ids, with timings (seconds)."""

    chunk: np.ndarray  # (chunk_size, max_action_dim) normalised
    rationale_ids: list[int] = field(default_factory=list)
    rationale_complete: bool = False
    preprocess_s: float = 0.0
    action_ready_s: float = 0.0
    generate_s: float = 0.0


def pi0_hf_config(config: RefineVLAPi0Config, vocab_len: int, image_token_id: int) -> Any:
    """transformers' PI0Config for a random-init preset."""
    from transformers import PI0Config

    text, vision, expert = config.base.text, config.base.vision, config.base.expert
    vocab = -(-max(vocab_len, image_token_id + 1) // 64) * 64
    gemma = lambda s: {  # noqa: E731
        "model_type": "gemma", "hidden_size": s.hidden_size, "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_hidden_layers, "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_key_value_heads, "head_dim": s.head_dim, "vocab_size": vocab, **s.extra}
    hf = PI0Config(
        vlm_config={
            "model_type": "paligemma", "text_config": gemma(text),
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": vision.hidden_size,
                              "intermediate_size": vision.intermediate_size,
                              "num_hidden_layers": vision.num_hidden_layers,
                              "num_attention_heads": vision.num_attention_heads, "patch_size": vision.patch_size,
                              "image_size": vision.image_size, "vision_use_head": False},
            "projection_dim": text.hidden_size, "image_token_id": image_token_id,
        },
        dit_config=gemma(expert), chunk_size=config.chunk_size, max_state_dim=config.max_state_dim,
        max_action_dim=config.max_action_dim, num_inference_steps=config.num_inference_steps,
    )
    hf._attn_implementation = config.attn_implementation  # noqa: SLF001 (transformers: no public setter)
    return hf


def pretrained_unavailable_message(source: str | None, error: Exception) -> str:
    return (
        f"cannot load the π0 base {source!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
        "Download it first: `huggingface-cli download lerobot/pi0_base --local-dir <folder>` (Apache-2.0) and the "
        "PaliGemma tokenizer, a gated repo whose Gemma licence must be accepted on "
        "https://huggingface.co/google/paligemma-3b-pt-224 before `huggingface-cli login` + `huggingface-cli download "
        "google/paligemma-3b-pt-224`; then set base_checkpoint=<folder> (HF_HUB_OFFLINE=1 refuses downloads)"
    )


def load_pretrained_pi0(source: str, config: RefineVLAPi0Config) -> Any:
    """PI0ForConditionalGeneration from a local folder or hub id; LeRobot's config.json (`"type": "pi0"`, no
    transformers model_type) is mapped onto transformers' PI0Config, and its weight names are renamed by transformers'
    conversion mapping at load."""
    from transformers import PI0Config, PI0ForConditionalGeneration
    from transformers.utils import cached_file

    kwargs = {"revision": config.base.revision, "dtype": DTYPES[config.dtype],
              "attn_implementation": config.attn_implementation, "use_safetensors": True}
    try:
        raw = json.loads(Path(cached_file(source, "config.json", revision=config.base.revision)).read_text())
        if raw.get("model_type") != "pi0":  # a LeRobot policy config
            hf = PI0Config(**{k: raw[k] for k in ("chunk_size", "max_state_dim", "max_action_dim",
                                                  "num_inference_steps") if isinstance(raw.get(k), int)})
            kwargs["config"] = hf
        return PI0ForConditionalGeneration.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise Pi0ModelError(pretrained_unavailable_message(source, e)) from e


def build_pi0(config: RefineVLAPi0Config, target_order: str | None = None, base_checkpoint: str | None = None,
              seed: int = 0) -> RefineVLAPi0:
    """A RefineVLAPi0 from a preset config; `base_checkpoint` (local folder or hub id) switches it to pretrained."""
    data = config.to_dict()
    if target_order is not None:
        data["target_order"] = target_order
    if base_checkpoint is not None:
        data["base"].update(source="pretrained", pretrained=str(base_checkpoint))
    return RefineVLAPi0.build(RefineVLAPi0Config.from_dict(data), seed=seed)


class RefineVLAPi0(torch.nn.Module):
    """The π0 ReFineVLA model: `vlm` (PI0ForConditionalGeneration), `processor`, `refinevla_config`, `stats`."""

    family = "pi0"

    def __init__(self, vlm: Any, processor: RefineVLAPi0Processor, config: RefineVLAPi0Config,
                 stats: ActionStats | None = None) -> None:
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.refinevla_config = config
        processor.config = config
        if stats is not None:
            processor.set_action_stats(stats)
        rows = self.embedding_matrix().shape[0]
        # PaliGemma's <image> id may lie past the embedding (257152 in π0 base): PI0 swaps it for image features
        text_ids = len(processor.tokenizer) - (processor.image_token_id == len(processor.tokenizer) - 1)
        if rows < text_ids:
            raise Pi0ModelError(f"the tokenizer has {len(processor.tokenizer)} tokens but the VLM embedding only "
                                f"{rows} rows: the tokenizer and the weights come from different models")
        hf = vlm.config
        if (hf.chunk_size, hf.max_action_dim, hf.max_state_dim) != (
                config.chunk_size, config.max_action_dim, config.max_state_dim):
            raise Pi0ModelError(f"the π0 weights have chunk_size/max_action_dim/max_state_dim {hf.chunk_size}/"
                                f"{hf.max_action_dim}/{hf.max_state_dim}, the config {config.chunk_size}/"
                                f"{config.max_action_dim}/{config.max_state_dim}")

    @property
    def pi0(self) -> Any:
        """The PI0ForConditionalGeneration (under peft's wrapper when LoRA is on: the adapters sit inside it)."""
        get_base = getattr(self.vlm, "get_base_model", None)
        return get_base() if callable(get_base) else self.vlm

    @property
    def stats(self) -> ActionStats | None:
        return self.processor.stats

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.pi0.action_out_proj.weight.dtype

    def embedding_matrix(self) -> torch.Tensor:
        """The VLM's token embeddings: PaliGemma ties its LM head to them, so they also give the rationale logits."""
        return self.pi0.model.vlm.get_input_embeddings().weight

    def new_token_ids(self) -> list[int]:
        return []  # the rationale is ordinary text; π0 adds no tokens

    # ---- what the trainer asks of a model family (training_pi0.py) -------------------------------------------
    def training_frames(self, dataset: Any, episodes: Sequence[int], seed: int = 0,
                        rationale_dropout: float = 0.0) -> Any:
        return training_pi0.ChunkFrames(dataset, episodes, seed=seed, rationale_dropout=rationale_dropout,
                           chunk_size=self.refinevla_config.chunk_size)

    @staticmethod
    def collator(processor: RefineVLAPi0Processor) -> Any:
        return training_pi0.ChunkCollator(processor)

    def prepare_training(self, train_config: Any) -> Any:
        return training_pi0.prepare_training(self, train_config)

    @staticmethod
    def evaluate_for(trainer: Any) -> dict[str, Any]:
        return training_pi0.evaluate(trainer)

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: RefineVLAPi0Config, seed: int = 0) -> RefineVLAPi0:
        from transformers import PI0ForConditionalGeneration

        if config.base.source == "random":
            processor = RefineVLAPi0Processor(build_hf_processor(config), config)
            hf = pi0_hf_config(config, len(processor.tokenizer), processor.image_token_id)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vlm = PI0ForConditionalGeneration(hf)
            vlm = vlm.to(DTYPES[config.dtype])
        else:
            vlm = load_pretrained_pi0(str(config.base.pretrained), config)
            hf = vlm.config
            data = {**config.to_dict(), "chunk_size": hf.chunk_size, "max_state_dim": hf.max_state_dim,
                    "max_action_dim": hf.max_action_dim}
            data["execute_steps"] = min(config.execute_steps, hf.chunk_size)
            config = RefineVLAPi0Config.from_dict(data)
            vision = hf.vlm_config.vision_config  # the image size and token count come from the weights
            processor = RefineVLAPi0Processor(build_hf_processor(config, vision.image_size, vision.patch_size),
                                              config)
            if hf.vlm_config.image_token_id != processor.image_token_id:
                hf.vlm_config.image_token_id = processor.image_token_id  # PI0 replaces image ids by features
        return cls(vlm.eval(), processor, config)

    # ---- the two passes ---------------------------------------------------------------------------------------
    def prefix_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor,
                     pixel_attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> Any:
        """The VLM over the prefix (+ rationale): last hidden states and the KV cache the expert attends to."""
        pi0 = self.pi0.model
        embeds = pi0.embed_prefix(input_ids, pixel_values.to(self.dtype), pixel_attention_mask)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return pi0.vlm(inputs_embeds=embeds, attention_mask=attention_mask, token_type_ids=token_type_ids,
                       position_ids=attention_mask.cumsum(-1) - 1, use_cache=True)

    def _velocity(self, state: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, dit_attention_mask: torch.Tensor,
                  cache: Any) -> torch.Tensor:
        out = self.pi0(state=state.to(self.dtype), noise=x_t.to(self.dtype), timestep=t,
                       attention_mask=dit_attention_mask, cache=cache)
        return out.logits

    def rationale_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of VLM hidden states (tied embedding matrix)."""
        return hidden @ self.embedding_matrix().to(hidden.dtype).T

    # ---- training ---------------------------------------------------------------------------------------------
    def forward(self, *, lambda_rationale: float = 0.0, noise: torch.Tensor | None = None,
                timestep: torch.Tensor | None = None, **batch: Any) -> Pi0Output:
        """The joint loss on a `processor.training_batch` (see the module docstring)."""
        device = self.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = self.prefix_pass(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                batch["pixel_attention_mask"], batch["token_type_ids"])
        actions = batch["actions"].float()
        n = actions.shape[0]
        hf = self.pi0.config
        if noise is None:
            noise = torch.randn_like(actions)
        if timestep is None:
            beta = torch.distributions.Beta(torch.tensor(hf.time_sampling_beta_alpha),
                                            torch.tensor(hf.time_sampling_beta_beta))
            timestep = (beta.sample((n,)) * hf.time_sampling_scale + hf.time_sampling_offset).to(device)
        t = timestep.float()[:, None, None]
        x_t = t * noise + (1 - t) * actions
        velocity = self._velocity(batch["state"], x_t, timestep.float(), batch["dit_attention_mask"], out.cache)
        valid = (~batch["action_is_pad"].bool())[:, :, None].expand(-1, -1, ACTION_DIM)
        error = (velocity.float()[..., :ACTION_DIM] - (noise - actions)[..., :ACTION_DIM]) ** 2
        flow = (error * valid).sum() / valid.sum().clamp(min=1)

        mask = batch["rationale_mask"][:, 1:]
        n_rat = int(mask.sum())
        hidden = out.last_hidden_state[:, :-1][mask]
        rationale_logits = None
        if n_rat:
            grad = lambda_rationale > 0
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                rationale_logits = self.rationale_logits(hidden if grad else hidden.detach()).float()
                labels = batch["input_ids"][:, 1:][mask]
                rationale = functional.cross_entropy(rationale_logits, labels)
            correct = int((rationale_logits.detach().argmax(-1) == labels).sum())
        else:
            rationale, correct = torch.zeros((), device=device), 0
        total = flow + lambda_rationale * rationale if lambda_rationale > 0 else flow
        loss = JointLoss(total, flow, rationale, int(valid.sum()), n_rat, 0, correct)
        return Pi0Output(loss, velocity, rationale_logits)

    # ---- inference --------------------------------------------------------------------------------------------
    def _decode_rationale(self, cache: Any, attention_mask: torch.Tensor, last_hidden: torch.Tensor,
                          max_tokens: int) -> tuple[list[list[int]], list[bool], torch.Tensor]:
        """Greedy, KV-cached: each new token is fed into `cache`; rows that finished feed masked padding."""
        proc = self.processor
        embed = self.pi0.model.vlm.get_input_embeddings()
        banned = [i for i in (proc.image_token_id, proc.pad_id, proc.bos_id) if i < embed.weight.shape[0]]
        n = attention_mask.shape[0]
        ids: list[list[int]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=attention_mask.device)
        logits = self.rationale_logits(last_hidden).float()
        for step in range(max_tokens):
            logits[:, banned] = float("-inf")
            token = logits.argmax(-1)
            if step == max_tokens - 1:
                token = torch.full_like(token, proc.eos_id)  # the training targets end with <eos> within the cap
            token = torch.where(done, torch.full_like(token, proc.pad_id), token)
            for b in range(n):
                if not done[b]:
                    ids[b].append(int(token[b]))
            attention_mask = torch.cat([attention_mask, (~done).long()[:, None]], dim=1)
            done = done | (token == proc.eos_id)
            out = self.pi0.model.vlm(inputs_embeds=embed(token[:, None]), attention_mask=attention_mask,
                                     position_ids=attention_mask.cumsum(-1)[:, -1:] - 1, cache=cache, use_cache=True)
            if bool(done.all()):
                break
            logits = self.rationale_logits(out.last_hidden_state[:, -1]).float()
        complete = [bool(r) and r[-1] == proc.eos_id and len(r) < max_tokens for r in ids]
        return ids, complete, attention_mask

    def _feed(self, cache: Any, attention_mask: torch.Tensor, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Teacher-force given rationale ids (a cached rationale) into the cache; right-padded rows are masked."""
        length = max(len(r) for r in rows)
        if length == 0:
            return attention_mask
        ids = torch.full((len(rows), length), self.processor.pad_id, dtype=torch.long, device=attention_mask.device)
        fed_mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            if r:
                ids[b, : len(r)] = torch.tensor(list(r))
                fed_mask[b, : len(r)] = 1
        attention_mask = torch.cat([attention_mask, fed_mask], dim=1)
        positions = (attention_mask.cumsum(-1) - 1)[:, -length:]
        self.pi0.model.vlm(inputs_embeds=self.pi0.model.vlm.get_input_embeddings()(ids), cache=cache,
                           attention_mask=attention_mask, position_ids=positions, use_cache=True)
        return attention_mask

    def _sample(self, state: torch.Tensor, attention_mask: torch.Tensor, cache: Any,
                generator: torch.Generator | None) -> torch.Tensor:
        """Euler integration of the learned velocity from t = 1 (noise) to t = 0 (actions); the cache is cropped
        back to the prefix after every step, as PI0.sample_actions does."""
        cfg = self.refinevla_config
        n = state.shape[0]
        x = torch.randn((n, cfg.chunk_size, cfg.max_action_dim), generator=generator).to(self.device)
        prefix_length = cache.get_seq_length()
        dt = -1.0 / cfg.num_inference_steps
        for step in range(cfg.num_inference_steps):
            t = torch.full((n,), 1.0 + step * dt, dtype=torch.float32, device=self.device)
            v = self._velocity(state, x, t, attention_mask, cache).float()
            cache.crop(prefix_length - cache.get_seq_length())  # drop this step's expert keys/values
            x = x + dt * v
        return x

    @torch.no_grad()
    def generate(self, images: Sequence[np.ndarray], instructions: Sequence[str], *, plan: str = "action",
                 fed_rationales: Sequence[Sequence[int]] | None = None, max_rationale_tokens: int | None = None,
                 seed: int = 0) -> list[Pi0Generated]:
        """Per row: a chunk and (plan = the target order) a fresh rationale; `fed_rationales` (rationale_then_action,
        plan "action") conditions the chunk on cached rationale ids."""
        order = self.refinevla_config.target_order
        if plan not in ("action", order):
            raise Pi0ModelError(f"plan {plan!r} does not match this model's target order {order!r}")
        t0 = time.perf_counter()
        inputs = {k: v.to(self.device) for k, v in self.processor.inference_prefix(images, instructions).items()}
        preprocess_s = time.perf_counter() - t0
        generator = torch.Generator().manual_seed(seed)
        max_r = int(max_rationale_tokens or self.refinevla_config.max_rationale_tokens)
        out = self.prefix_pass(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                                inputs["pixel_attention_mask"])
        cache, mask = out.cache, inputs["attention_mask"]
        rationale_ids: list[list[int]] = [[] for _ in images]
        complete = [False] * len(images)
        if plan == "rationale_then_action":
            rationale_ids, complete, mask = self._decode_rationale(cache, mask, out.last_hidden_state[:, -1], max_r)
        elif fed_rationales is not None and order == "rationale_then_action":
            mask = self._feed(cache, mask, fed_rationales)
        chunks = self._sample(inputs["state"], mask, cache, generator)
        action_ready = time.perf_counter() - t0
        if plan == "action_then_rationale":
            rationale_ids, complete, _ = self._decode_rationale(cache, mask, out.last_hidden_state[:, -1], max_r)
        total = time.perf_counter() - t0
        return [Pi0Generated(chunk=chunks[b].float().cpu().numpy(), rationale_ids=rationale_ids[b],
                             rationale_complete=complete[b], preprocess_s=preprocess_s, action_ready_s=action_ready,
                             generate_s=total - preprocess_s) for b in range(len(images))]

    # ---- persistence ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: Any, extra_files: dict[str, Any] | None = None) -> Any:
        return save_pi0_checkpoint(directory, self.vlm, self.processor, self.stats, self.refinevla_config,
                                   extra_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
                        verify: Verify = "auto") -> RefineVLAPi0:
        """A RefineVLAPi0 from a folder written by save_pi0_checkpoint (manifest verified first)."""
        from transformers import PI0ForConditionalGeneration

        directory = Path(directory)
        verify_checkpoint(directory, verify)
        try:
            config = RefineVLAPi0Config.from_dict(json.loads((directory / PI0_CONFIG_NAME).read_text()),
                                                  where=str(directory / PI0_CONFIG_NAME))
            stats = ActionStats.load(directory / STATS_FILENAME)
        except (OSError, json.JSONDecodeError, ValueError, DataError) as e:
            raise CheckpointError(f"checkpoint {directory}: {e}") from e
        try:
            processor = RefineVLAPi0Processor.from_pretrained(directory, config, stats)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"the tokenizer/processor files of {directory} are unusable ({e})") from e
        try:
            vlm, info = PI0ForConditionalGeneration.from_pretrained(
                str(directory), use_safetensors=True, dtype=DTYPES[dtype or config.dtype], local_files_only=True,
                attn_implementation=config.attn_implementation, output_loading_info=True)
        except Exception as e:  # safetensors/torch raise many types for damaged or mismatched weights
            raise CheckpointError(f"the π0 weights in {directory} cannot be loaded ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]}); copy the checkpoint again") from e
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise CheckpointError(f"the weights in {directory} do not fit config.json: missing "
                                  f"{list(info.get('missing_keys', []))[:5]}, mismatched "
                                  f"{list(info.get('mismatched_keys', []))[:5]}")
        vlm.eval().to(device)
        try:
            return cls(vlm, processor, config, stats)
        except Pi0ModelError as e:
            raise CheckpointError(f"checkpoint {directory}: {e}") from e
