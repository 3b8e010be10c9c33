"""ReFineVLA's first stage: a teacher writes a four-section rationale for the frames of a demonstration dataset.

    teacher (sim | openai | hf) -> runner (preflight, schedule, concurrency, progress) -> store (SQLite WAL)
        -> export into <dataset>/rationales.jsonl, which training reads

`refinevla annotate` (annotation/cli.py) is the command; `annotate_dataset` the library entry point.
"""

from __future__ import annotations

from refinevla_core.annotation.config import TEACHERS, AnnotationConfig, PromptConfig
from refinevla_core.annotation.hf_teacher import HFVLMTeacher
from refinevla_core.annotation.openai_teacher import MODEL_REQUIRED, OpenAICompatTeacher, resolve_api_key
from refinevla_core.annotation.runner import RunSummary, Shard, annotate_dataset, export_rationales
from refinevla_core.annotation.sim_teacher import SimTeacher
from refinevla_core.annotation.store import AnnotationKey, AnnotationStore, StoreError
from refinevla_core.annotation.teacher import FrameRequest, Teacher, TeacherError, TeacherReply


def make_teacher(config: AnnotationConfig) -> Teacher:
    """The teacher named by config.teacher, built from the config (API key read from config.api_key_env)."""
    if config.teacher == "sim":
        return SimTeacher(future_actions=config.future_actions)
    if config.teacher == "openai":
        if not config.model:  # the settings first: no point asking for a key of an unusable configuration
            raise TeacherError(MODEL_REQUIRED)
        return OpenAICompatTeacher(config, api_key=resolve_api_key(config.api_key_env))
    if config.teacher == "hf":
        return HFVLMTeacher(config)
    raise TeacherError(f"teacher {config.teacher!r} is unknown; choose one of {list(TEACHERS)}")


__all__ = [
    "TEACHERS", "AnnotationConfig", "AnnotationKey", "AnnotationStore", "FrameRequest", "HFVLMTeacher",
    "OpenAICompatTeacher", "PromptConfig", "RunSummary", "Shard", "SimTeacher", "StoreError", "Teacher",
    "TeacherError", "TeacherReply", "annotate_dataset", "export_rationales", "make_teacher",
]
