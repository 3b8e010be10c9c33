"""Opt-in adapters: SpatialVLA and OpenVLA checkpoints behind the same Policy interface (predict / predict_batch /
reset -> PolicyOutput), for comparisons against the paper's base model and its best-known baseline.

Why opt-in: both ship their modelling code inside the checkpoint, so loading them executes that code
(`trust_remote_code=True`). refinevla never does this on its own: the caller must pass `trust_remote_code=True`
explicitly, for a source they trust. Weights are loaded as safetensors only.

Honest limits (this repository's CI): neither checkpoint can be downloaded here (no network) and their remote code was
written for transformers 4.4x (this project runs 5.x; e.g. `AutoModelForVision2Seq` no longer exists, OpenVLA's code
is resolved through its `auto_map` instead). The loading code below is the real path from the models' cards; what the
tests exercise is the refusal without `trust_remote_code`, the offline failure message, and the output conversion
with stand-in objects of the same `predict_action`/`decode_actions` API. Load failures raise AdapterError with the
model id and the likely fix (network/HF cache, or an environment with the transformers version the card names).

Conventions: both models' Bridge statistics ("bridge_orig") produce Bridge-convention actions — dx, dy, dz (m),
droll, dpitch, dyaw (rad, Euler), gripper 1 = open / 0 = closed (the SimplerEnv wrappers binarise it with > 0.5 -> +1
open) — which is PolicyOutput's convention; the gripper is clipped to [0, 1] and non-finite actions are refused.
SpatialVLA predicts a chunk of actions; the first is returned and the whole chunk kept in `last_chunk`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from refinevla_core.model.processor_refinevla import check_image
from refinevla_core.policy_types import PolicyOutput

SPATIALVLA_DEFAULT = "IPEC-COMMUNITY/spatialvla-4b-224-pt"
OPENVLA_DEFAULT = "openvla/openvla-7b"


class AdapterError(RuntimeError):
    """A third-party VLA cannot be loaded or returned an unusable action; the message names the model and the fix."""


def _require_trust(name: str, model_id: str, trust_remote_code: bool) -> None:
    if not trust_remote_code:
        raise AdapterError(
            f"{name} ({model_id}) ships its model code inside the checkpoint; loading it runs that code. "
            "Pass trust_remote_code=True if you trust this source (refinevla never does it on its own)."
        )


def _load_failed(name: str, model_id: str, error: Exception) -> AdapterError:
    first = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    return AdapterError(
        f"cannot load {name} from {model_id!r} ({type(error).__name__}: {first}). Needs network access or a filled "
        "HF cache (HF_HUB_OFFLINE=1 refuses downloads) or a local folder; its remote code targets transformers 4.4x, "
        "so a separate environment with the version on the model card may be required."
    )


def to_policy_output(action: Any, started: float, name: str, **timings: float) -> PolicyOutput:
    """Validate a third-party 7-D Bridge action and wrap it; non-finite or mis-shaped actions are refused."""
    a = np.asarray(action, dtype=np.float64).reshape(-1)
    if a.shape != (7,):
        raise AdapterError(f"{name} returned an action of shape {np.shape(action)}; expected 7 values")
    if not np.isfinite(a).all():
        raise AdapterError(f"{name} returned a non-finite action {a.tolist()}; refusing to pass it on")
    a[6] = np.clip(a[6], 0.0, 1.0)
    timings_ms = {k: v * 1e3 for k, v in timings.items()}
    timings_ms["total"] = (time.perf_counter() - started) * 1e3
    return PolicyOutput(action=a.astype(np.float32), timings_ms=timings_ms)


class _AdapterPolicy:
    """What both adapters share: opt-in loading of remote code, device/dtype placement, batching by rows."""

    name = "adapter"
    DEFAULT_ID = ""
    DEFAULT_UNNORM_KEY = ""

    def __init__(self, model: Any, processor: Any, unnorm_key: str | None = None, device: str = "cpu",
                 dtype: Any = None) -> None:
        self.model = model
        self.processor = processor
        self.unnorm_key = unnorm_key or self.DEFAULT_UNNORM_KEY
        self.device = device
        self.dtype = dtype
        self.last_chunk: np.ndarray | None = None

    @classmethod
    def from_pretrained(cls, model_id: str | None = None, *, trust_remote_code: bool = False, device: str = "cuda",
                        dtype: str = "bfloat16", unnorm_key: str | None = None) -> Any:
        """Load the model and processor from a hub id or local folder (the model card's loading code); refused
        unless trust_remote_code=True, since the checkpoint ships the code that runs."""
        model_id = model_id or cls.DEFAULT_ID
        _require_trust(cls.name, model_id, trust_remote_code)
        from transformers import AutoProcessor

        torch_dtype = getattr(torch, dtype)
        try:
            processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)
            model = cls.load_model(model_id, torch_dtype).eval().to(device)
        except AdapterError:
            raise
        except Exception as e:  # hub, remote-code and version errors come in many types
            raise _load_failed(cls.name, model_id, e) from e
        return cls(model, processor, unnorm_key=unnorm_key, device=device, dtype=torch_dtype)

    @staticmethod
    def load_model(model_id: str, torch_dtype: Any) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        """Stateless between steps (no rationale cache): nothing to forget but the last chunk."""
        self.last_chunk = None

    def predict_batch(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> list[PolicyOutput]:
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions; give one per image")
        return [self.predict(im, ins) for im, ins in zip(images, instructions, strict=True)]

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        raise NotImplementedError

    def _to(self, inputs: Any) -> Any:
        if hasattr(inputs, "to"):
            inputs = inputs.to(self.device)
            if self.dtype is not None and "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs


class SpatialVLAPolicy(_AdapterPolicy):
    """SpatialVLA (PaliGemma2-based; the paper's base model), per its model card."""

    name = "SpatialVLA"
    DEFAULT_ID = SPATIALVLA_DEFAULT
    DEFAULT_UNNORM_KEY = "bridge_orig/1.0.0"

    @staticmethod
    def load_model(model_id: str, torch_dtype: Any) -> Any:
        from transformers import AutoModel

        return AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=torch_dtype, use_safetensors=True)

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        from PIL import Image

        started = time.perf_counter()
        check_image(image)
        inputs = self._to(self.processor(images=[Image.fromarray(image)], text=instruction, return_tensors="pt"))
        generated = self.model.predict_action(inputs)
        decoded = self.processor.decode_actions(generated, unnorm_key=self.unnorm_key)
        chunk = np.asarray(decoded["actions"], dtype=np.float64).reshape(-1, 7)
        self.last_chunk = chunk
        return to_policy_output(chunk[0], started, self.name)


class OpenVLAPolicy(_AdapterPolicy):
    """OpenVLA-7B, per its model card (prompt "In: What action should the robot take to {x}?\\nOut:")."""

    name = "OpenVLA"
    PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
    DEFAULT_ID = OPENVLA_DEFAULT
    DEFAULT_UNNORM_KEY = "bridge_orig"

    @staticmethod
    def load_model(model_id: str, torch_dtype: Any) -> Any:
        """The model class its auto_map names (OpenVLA predates transformers' Auto classes for it)."""
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        config = AutoConfig.from_pretrained(model_id, trust_remote_code=True)
        auto_map = getattr(config, "auto_map", {}) or {}
        ref = next((auto_map[k] for k in ("AutoModelForVision2Seq", "AutoModelForImageTextToText", "AutoModel")
                    if k in auto_map), None)
        if ref is None:
            raise AdapterError(f"{model_id} has no model class in its auto_map ({sorted(auto_map)})")
        model_cls = get_class_from_dynamic_module(ref, model_id)
        return model_cls.from_pretrained(model_id, dtype=torch_dtype, use_safetensors=True, trust_remote_code=True)

    def predict(self, image: np.ndarray, instruction: str) -> PolicyOutput:
        from PIL import Image

        started = time.perf_counter()
        check_image(image)
        prompt = self.PROMPT.format(instruction=instruction.strip().lower())
        inputs = self._to(self.processor(prompt, Image.fromarray(image)))
        action = self.model.predict_action(**inputs, unnorm_key=self.unnorm_key, do_sample=False)
        return to_policy_output(action, started, self.name)
