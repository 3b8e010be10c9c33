"""The PaliGemma backbone of the random-init presets, built offline: a BPE tokenizer trained on a built-in corpus of
robot instructions and rationale phrases, the PaliGemmaProcessor around it, and the PaliGemmaConfig of a size.

Why a module of its own: the models (modeling_refinevla, the π0 processor) build these pieces, and presets.py builds
the models; keeping the pieces here keeps the imports one-way.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from refinevla_core.config import ConfigError
from refinevla_core.model.configuration_refinevla import RefineVLAConfig

# ---- the offline tokenizer --------------------------------------------------------------------------------------
_OBJECTS = ("cube", "red cube", "block", "spoon", "towel", "carrot", "plate", "eggplant", "basket", "cup", "can",
            "drawer", "bottle", "sponge", "green block", "yellow block", "apple", "coke can", "target", "goal")
_VERBS = ("put", "place", "push", "pick up", "move", "stack", "open", "close", "lift", "slide", "grasp", "drop")
_PLACES = ("on the towel", "on the plate", "in the basket", "into the cup", "to the red target", "on top of the block",
           "to the left", "to the right", "in the sink", "near the cup", "on the table", "into the drawer")
_RATIONALE = (
    "Observation: a {o} lies on the table near a {p}.",
    "Situation Analysis: the gripper is open and above the {o}; the task has not started.",
    "Situation Analysis: the {o} is held by the gripper and lifted.",
    "Spatial Reasoning: the {o} is left of the gripper, about 5 cm ahead and 3 cm below it.",
    "Spatial Reasoning: the {p} is to the right of the {o}, the gripper is behind it.",
    "Task Planning: move the gripper down, close it, lift the {o}, move right, open the gripper.",
    "Task Planning: approach from above, rotate the wrist, then push forward by 10 cm.",
)


# The simulator tasks' words (refinevla_core.sim.instructions / sim.maniskill) and the sim teacher's short rationale
# phrases (annotation/sim_teacher.py): in the corpus, so a whole sim rationale costs ~60 tokens, not ~180.
_SIM_INSTRUCTIONS = (
    "push the blue cube to the red target", "slide the cube onto the target disc", "shove the blue block forward "
    "until it reaches the red and white target", "pick up the red cube and move it to the green goal",
    "grasp the red block and bring it to the green sphere", "lift the cube, then hold it at the green marker",
    "grab the red cube and move it to the green goal", "stack the red cube on the green cube",
    "put the red block on top of the green block", "place the red cube on the green cube",
)
_SIM_THINGS = ("blue cube", "red cube", "green cube", "red/white target disc", "green goal sphere",
               "top of the green cube")
_SIM_PHASES = ("approach, reach the {o}", "grasp, close on the {o}", "lift, lift the {o}",
               "transport, carry the {o} to the {g}", "place, lower the {o} onto the {g}",
               "push, push the {o} to the {g}", "release, open to release the {o}", "done, task complete")
_SIM_STEPS = ("approach, push, done", "push, done", "approach, grasp, lift, transport, place, release, done",
              "grasp, lift, transport, place, release, done", "lift, transport, place, release, done",
              "transport, place, release, done", "place, release, done", "release, done", "approach, grasp, lift, "
              "done", "lift, done", "done")
_SIM_MOVES = ("move forward", "move back", "move left", "move right", "move up", "move down", "move forward, left",
              "move forward, right", "move back, up", "move forward, down", "move left, down", "hold position")


def _sim_rationale_lines() -> list[str]:
    words = ("forward", "back", "left", "right", "up", "down")
    lines = []
    for i, (o, g) in enumerate(itertools.product(_SIM_THINGS[:3], _SIM_THINGS[3:])):
        lines.append(f"Observation: gripper {'open' if i % 2 else 'closed'}; {o}, {g}.")
        lines += [f"Situation Analysis: phase: {p.format(o=o, g=g)}; holds {'nothing' if j % 2 else 'the ' + o}."
                  for j, p in enumerate(_SIM_PHASES)]
        lines += [f"Spatial Reasoning: {o} {n} cm {words[n % 6]}, {n % 7} cm {words[(n + 2) % 6]} of the gripper; "
                  f"{g} {n % 11} cm {words[(n + 4) % 6]} of the {o}." for n in range(i, 31, 3)]
        lines += [f"Task Planning: steps: {st}; now {_SIM_MOVES[(i + k) % len(_SIM_MOVES)]}, then "
                  f"{('close', 'open')[k % 2]} the gripper." for k, st in enumerate(_SIM_STEPS)]
    return lines


def tokenizer_corpus() -> list[str]:
    """Deterministic robot-domain text: instructions, rationale sentences, numbers and headings."""
    lines = [f"{v} the {o} {p}" for v, o, p in itertools.product(_VERBS, _OBJECTS, _PLACES)]
    lines += [t.format(o=o, p=p.split()[-1]) for t in _RATIONALE for o in _OBJECTS for p in _PLACES[:4]]
    lines += [f"{n} cm, {n} mm, {n}.{n % 10} m, {n} degrees" for n in range(100)]
    lines += list(_SIM_INSTRUCTIONS) + _sim_rationale_lines()
    return lines


def train_offline_tokenizer(vocab_size: int) -> Any:
    """A Gemma-style (SentencePiece-like) BPE tokenizer trained on `tokenizer_corpus()`; no download.

    <pad>=0 <eos>=1 <bos>=2 <unk>=3 and 256 byte-fallback tokens like Gemma's, so any text (accents, digits, emoji)
    encodes. Pieces never cross a space, like SentencePiece's (split_by_whitespace): an instruction is one token per
    word. Merging across spaces turned "push the blue cube to the red target" into 3 pieces, and action-only runs on
    the demo's data then ended at 1.3-1.7x the teacher-forced error (3 of 3 runs; 4/30 closed loop vs 15-18/30; see
    docs/demo.md "What the tokenizer did"). Returns a transformers GemmaTokenizer.
    """
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # "▁word" pieces, none across words
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    bpe.train_from_iterator(tokenizer_corpus(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges)


def base_unavailable_message(pretrained: str | None, error: Exception) -> str:
    return (
        f"cannot load the base model {pretrained!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        "set base.pretrained to a local folder with a PaliGemma checkpoint (config.json, *.safetensors, tokenizer), "
        "or fill the HF cache first (huggingface-cli download <id>; HF_HUB_OFFLINE=1 refuses downloads)"
    )


# ---- building -------------------------------------------------------------------------------------------------
def build_processor(config: RefineVLAConfig) -> Any:
    """The HF PaliGemmaProcessor of a preset: offline tokenizer (random) or the base checkpoint's (pretrained)."""
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip import SiglipImageProcessorPil

    base = config.base
    if base.source == "pretrained":
        try:
            return PaliGemmaProcessor.from_pretrained(base.pretrained, revision=base.revision,
                                                      trust_remote_code=base.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(base_unavailable_message(base.pretrained, e)) from e
    size = base.vision.image_size
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size},
                                              image_seq_length=base.vision.num_image_tokens)
    tokenizer = train_offline_tokenizer(base.tokenizer_vocab_size)
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def paligemma_config(config: RefineVLAConfig, vocab_len: int, image_token_id: int) -> Any:
    """PaliGemmaConfig with a Gemma2 text model (PaliGemma2) for a random-init preset."""
    from transformers import PaliGemmaConfig

    text, vision = config.base.text, config.base.vision
    vocab_size = text.vocab_size or -(-vocab_len // 64) * 64
    if vocab_size < vocab_len:
        raise ConfigError(f"base.text.vocab_size {vocab_size} is smaller than the tokenizer ({vocab_len} tokens)")
    return PaliGemmaConfig(
        text_config={
            "model_type": "gemma2", "vocab_size": vocab_size, "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "head_dim": text.head_dim, "query_pre_attn_scalar": text.head_dim,
            "tie_word_embeddings": config.base.tie_word_embeddings, **text.extra,
        },
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads, "patch_size": vision.patch_size,
            "image_size": vision.image_size, "vision_use_head": False, **vision.extra,
        },
        image_token_index=image_token_id,
        projection_dim=config.base.projection_dim or text.hidden_size,
        tie_word_embeddings=config.base.tie_word_embeddings,
    )
