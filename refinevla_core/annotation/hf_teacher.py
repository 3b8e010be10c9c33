"""The local Hugging Face VLM teacher: any transformers image-text-to-text model, no API and no per-token bill.

Loads `AutoModelForImageTextToText` + `AutoProcessor` from a local folder (save_pretrained layout) or a hub id, and
prompts it with the same template as the API teacher: through the processor's chat template when it has one (Qwen2-VL,
Idefics3, LLaVA-style), else as plain text with the images (PaliGemma-style). Decoding is greedy, so a rerun gives
the same rationale; an unusable reply is re-asked with the parse error appended, then recorded as a failed frame.

Hub ids need network access or a warm cache (this project's tests run with HF_HUB_OFFLINE=1 and use a tiny
random-initialised model saved to a folder, which writes garbage text: the test checks that garbage is recorded as a
failure with its reason, never stored as a rationale).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refinevla_core.annotation import prompts
from refinevla_core.annotation.config import AnnotationConfig
from refinevla_core.annotation.teacher import FrameRequest, Teacher, TeacherError, TeacherReply
from refinevla_core.rationale import RationaleError, parse_rationale


class HFVLMTeacher(Teacher):
    """A transformers image-text-to-text model run locally, one frame at a time."""

    kind = "hf"
    needs_images = True
    needs_state = False
    concurrency = 1

    def __init__(self, config: AnnotationConfig) -> None:
        if not config.model:
            raise TeacherError("--model is required for --teacher hf: a local model folder (save_pretrained layout) "
                               "or a hub id such as Qwen/Qwen2-VL-2B-Instruct")
        self.config = config
        local = Path(config.model).expanduser()
        self.model_ref = str(local.resolve()) if local.is_dir() else config.model
        self.model: Any = None
        self.processor: Any = None

    @property
    def name(self) -> str:
        return f"hf:{self.model_ref}"

    @property
    def prompt_hash(self) -> str:
        p = self.config.prompt
        return prompts.prompt_hash(system=p.system, user=p.user, reask=p.reask,
                                   future_actions=self.config.future_actions,
                                   image_offsets=list(self.config.image_offsets), max_tokens=self.config.max_tokens)

    def check(self) -> None:
        """Load the processor and model now, so a wrong path fails before anything is written."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(self.model_ref)
            dtype = self.config.hf_dtype if self.config.hf_dtype == "auto" else getattr(torch, self.config.hf_dtype)
            self.model = AutoModelForImageTextToText.from_pretrained(self.model_ref, dtype=dtype)
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise TeacherError(
                f"cannot load the HF teacher {self.config.model!r} ({e.__class__.__name__}: {str(e)[:300]}); pass a "
                "local folder written by save_pretrained (config.json, weights, processor files) or a hub id that is "
                "cached (HF_HUB_OFFLINE=1 forbids downloads) of an image-text-to-text model"
            ) from None
        try:
            self.model.to(self.config.hf_device)
        except (RuntimeError, AssertionError) as e:
            raise TeacherError(f"cannot move the HF teacher to device {self.config.hf_device!r} ({e}); "
                               "set hf_device to cpu or an available cuda device") from None
        self.model.eval()

    def close(self) -> None:
        self.model = None
        self.processor = None

    def _inputs(self, conversation: list[dict[str, Any]], images: list[Any]) -> Any:
        processor = self.processor
        if getattr(processor, "chat_template", None):
            text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        else:
            text = "\n\n".join(turn["text"] for turn in conversation)
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = [images]
        inputs = processor(**kwargs)
        inputs.pop("labels", None)
        return inputs.to(self.model.device)

    def _generate(self, conversation: list[dict[str, Any]], images: list[Any]) -> tuple[str, int, int]:
        import torch

        inputs = self._inputs(conversation, images)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.config.max_tokens, do_sample=False)
        prompt_len = int(inputs["input_ids"].shape[1])
        new_tokens = out[:, prompt_len:]
        text = self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
        return text, prompt_len, int(new_tokens.shape[1])

    def annotate(self, request: FrameRequest) -> TeacherReply:
        from PIL import Image

        self.check()
        p = self.config.prompt
        user_text = prompts.render(p.user, request.prompt_values().as_fields())
        images = [Image.fromarray(img) for img in request.images]
        chat = bool(getattr(self.processor, "chat_template", None))
        if chat:
            content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
            content.append({"type": "text", "text": user_text})
            conversation: list[dict[str, Any]] = [
                {"role": "system", "content": [{"type": "text", "text": p.system.strip()}]},
                {"role": "user", "content": content},
            ]
        else:
            conversation = [{"text": p.system.strip()}, {"text": user_text}]
        reply = TeacherReply(rationale=None)
        last_error = ""
        for _ in range(1 + self.config.max_reasks):
            text, prompt_tokens, completion_tokens = self._generate(conversation, images)
            reply.calls += 1
            reply.prompt_tokens += prompt_tokens
            reply.completion_tokens += completion_tokens
            reply.reply = text
            try:
                reply.rationale = parse_rationale(text)
                reply.error = ""
                return reply
            except RationaleError as e:
                last_error = str(e)
            reask = prompts.render(p.reask, {"error": last_error})
            if chat:
                conversation = [*conversation,
                                {"role": "assistant", "content": [{"type": "text", "text": text or "(empty)"}]},
                                {"role": "user", "content": [{"type": "text", "text": reask}]}]
            else:
                conversation = [*conversation, {"text": text or "(empty)"}, {"text": reask}]
        reply.error = f"invalid reply after {reply.calls} attempt(s): {last_error}"
        return reply
