"""The local HF VLM teacher with a real transformers model: a tiny random-initialised PaliGemma saved to a folder.

Random weights write garbage, so what is checked is the honest behaviour: the garbage is re-asked, then recorded as a
failed frame with the parse error as its reason, and never stored or exported as a rationale. Both prompt paths run:
the processor's chat template, and plain text for processors without one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from refinevla_core.annotation import AnnotationConfig, AnnotationKey, AnnotationStore, annotate_dataset
from refinevla_core.annotation.hf_teacher import HFVLMTeacher
from refinevla_core.annotation.teacher import FrameRequest, TeacherError
from test.core.annotation_util import make_dataset

# transformers' PaliGemma processor builds labels with np.array(copy=False) semantics numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
    "{{ m['role'] }}: {{ c['text'] }}\n{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_paligemma(folder: Path, chat_template: str | None) -> None:
    """A 2-layer PaliGemma (Gemma2 text + SigLIP vision, 28 px images, 4 image tokens) and its processor."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizerFast, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    torch.manual_seed(0)
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe.train_from_iterator(["observation situation analysis spatial reasoning task planning red cube"] * 4,
                            trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
              for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = GemmaTokenizerFast(vocab=bpe.get_vocab(), merges=merges)
    processor = PaliGemmaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 28, "width": 28},
                                                                           image_seq_length=4),
                                   tokenizer=tokenizer, chat_template=chat_template)
    config = PaliGemmaConfig(
        text_config={"model_type": "gemma2", "vocab_size": len(processor.tokenizer), "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 16},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14,
                       "vision_use_head": False},
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"), projection_dim=32,
    )
    config.text_config.num_image_tokens = 4
    PaliGemmaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module", params=["plain", "chat"])
def tiny_model(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(f"tiny-paligemma-{request.param}")
    build_tiny_paligemma(folder, CHAT_TEMPLATE if request.param == "chat" else None)
    return folder


def config_for(model: Path | str) -> AnnotationConfig:
    return AnnotationConfig(teacher="hf", model=str(model), max_tokens=6, max_reasks=1, hf_dtype="float32")


def test_garbage_from_a_random_model_is_a_failed_frame_with_its_reason(tiny_model):
    teacher = HFVLMTeacher(config_for(tiny_model))
    teacher.check()
    assert bool(getattr(teacher.processor, "chat_template", None)) == tiny_model.name.startswith("tiny-paligemma-chat")
    image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    reply = teacher.annotate(FrameRequest(
        episode=0, frame=0, num_frames=4, instruction="push the red cube", task="",
        future_actions=np.zeros((2, 7), np.float32), images=(image,), image_offsets=(0,)))
    assert not reply.ok and reply.rationale is None
    assert reply.calls == 2 and reply.completion_tokens == 12 and reply.prompt_tokens > 0
    assert reply.error.startswith("invalid reply after 2 attempt(s): the reply")


def test_through_the_runner_failures_are_stored_not_exported(tiny_model, tmp_path):
    make_dataset(tmp_path / "ds", episodes=1, frames=3)
    config = config_for(tiny_model)
    teacher = HFVLMTeacher(config)
    summary = annotate_dataset(tmp_path / "ds", teacher, config, progress=False)
    assert (summary.done, summary.failed, summary.exported_rows) == (0, 3, 0)
    assert not (tmp_path / "ds" / "rationales.jsonl").exists()
    with AnnotationStore(tmp_path / "ds" / "annotations.sqlite") as store:
        rows = store.rows(AnnotationKey("ds", teacher.name, teacher.prompt_hash))
    assert sorted(rows) == [(0, 0), (0, 1), (0, 2)]
    assert all(r.status == "failed" and r.error.startswith("invalid reply") for r in rows.values())
    assert teacher.name == f"hf:{tiny_model.resolve()}"


def test_a_model_that_cannot_load_names_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match=r"cannot load the HF teacher .*save_pretrained"):
        HFVLMTeacher(config_for(tmp_path / "empty")).check()
    with pytest.raises(TeacherError, match="--model is required for --teacher hf"):
        HFVLMTeacher(AnnotationConfig(teacher="hf"))
