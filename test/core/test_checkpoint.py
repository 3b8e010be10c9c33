"""Checkpoints: one HF-style folder (safetensors, tokenizer, processor, stats, refinevla config), written atomically,
loaded back exactly, and refused with a clear error when damaged or assembled from mismatched parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from refinevla_core.data.stats import ActionStats
from refinevla_core.model.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from refinevla_core.model.presets import build_processor, load_preset
from refinevla_core.model.processor_refinevla import RefineVLAProcessor
from test.core.model_util import INSTRUCTION, example_image, tiny_vla


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    vla = tiny_vla()
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(path, vla, vla.processor, vla.stats, vla.refinevla_config,
                    extra_files={"train_config.yaml": "lr: 0.001\n", "metrics.json": {"loss": 1.5}})
    return path


def copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(path):
    """What a careless user does after swapping files in: make the manifest agree, so the deeper checks run."""
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["files"] = {str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                         for p in sorted(path.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_round_trip_keeps_weights_stats_tokens_and_predictions(saved):
    vla = tiny_vla()
    names = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "stats.json",
            "refinevla_config.json", MANIFEST_NAME, "train_config.yaml", "metrics.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    back = load_checkpoint(saved)
    assert back.stats.allclose(vla.stats) and back.stats.num_frames == vla.stats.num_frames
    assert ActionStats.load(saved / "stats.json").allclose(vla.stats)
    assert back.refinevla_config == vla.refinevla_config
    for (name, a), (name2, b) in zip(vla.vlm.state_dict().items(), back.vlm.state_dict().items(), strict=True):
        assert name == name2 and torch.equal(a, b), name
    image = example_image(3)
    for plan in ("action", "rationale_then_action"):
        a, b = (m.generate([image], [INSTRUCTION], plan=plan)[0] for m in (vla, back))
        assert a.action_bins.tolist() == b.action_bins.tolist() and a.rationale_ids == b.rationale_ids
    np.testing.assert_array_equal(back.processor.decode_actions(a.action_bins),
                                  vla.processor.decode_actions(a.action_bins))
    assert json.loads((saved / "metrics.json").read_text()) == {"loss": 1.5}


def test_a_save_prints_nothing_and_reloads_equal(tmp_path, capfd, caplog):
    """No progress bar and no warning (e.g. accelerate's "Removed shared tensor") in the middle of a training log;
    the tied output head comes back tied and equal."""
    import logging

    vla = tiny_vla()
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        save_checkpoint(tmp_path / "ck", vla, vla.processor, vla.stats, vla.refinevla_config)
    out, err = capfd.readouterr()
    assert (out, err, caplog.text) == ("", "", "")
    back = load_checkpoint(tmp_path / "ck").vlm
    assert back.lm_head.weight.data_ptr() == back.get_input_embeddings().weight.data_ptr()
    for (name, a), (_, b) in zip(vla.vlm.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_the_folder_is_a_plain_transformers_checkpoint(saved):
    model = AutoModelForImageTextToText.from_pretrained(saved, local_files_only=True)
    processor = AutoProcessor.from_pretrained(saved, local_files_only=True)
    assert type(model).__name__ == "PaliGemmaForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids("<act_000>") == tiny_vla().processor.layout.action_token_start


def test_an_untied_output_head_survives(tmp_path):
    """The trainer's default (new_token_rows='head') trains only the head rows of the action tokens and saves an
    untied head: those rows must come back, distinct from the input embedding."""
    vla = tiny_vla(fresh=True)
    vlm = vla.vlm
    vlm.config.tie_word_embeddings = vlm.config.text_config.tie_word_embeddings = False
    vlm.lm_head.weight = torch.nn.Parameter(vlm.lm_head.weight.detach().clone())
    lay = vla.processor.layout
    with torch.no_grad():
        vlm.lm_head.weight[lay.action_token_start : lay.action_token_end] += 1.0
    save_checkpoint(tmp_path / "untied", vla, vla.processor, vla.stats, vla.refinevla_config)
    back = load_checkpoint(tmp_path / "untied").vlm
    torch.testing.assert_close(back.lm_head.weight, vlm.lm_head.weight)
    assert not torch.equal(back.lm_head.weight, back.get_input_embeddings().weight[: back.lm_head.weight.shape[0]])


def test_truncated_weights(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "ck")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors has \d+ bytes .* truncated"):
        load_checkpoint(path)


def test_corrupt_weights(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "ck")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # inside the safetensors JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt: its sha256"):
        load_checkpoint(path)
    # without hashing, the damaged header is still caught when the weights are read
    with pytest.raises(CheckpointError, match=r"weights .* cannot be loaded"):
        load_checkpoint(path, verify="size")


def test_missing_stats_and_missing_manifest(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "ck")
    (path / "stats.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing its action statistics stats.json"):
        load_checkpoint(path)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="not a complete refinevla checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")
    vla = tiny_vla()
    with pytest.raises(CheckpointError, match="needs the action statistics"):
        save_checkpoint(tmp_path / "nostats", vla, vla.processor, None, vla.refinevla_config)


def test_tokenizer_from_another_model_is_a_mismatch(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "ck")
    mid = load_preset("mid")
    other = RefineVLAProcessor(build_processor(mid), mid)  # a 4096-entry BPE: every id differs
    other.tokenizer.save_pretrained(str(path))
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="tokenizer/model mismatch"):
        load_checkpoint(path)


def test_foreign_and_pickled_models_are_refused(saved, tmp_path):
    path = copy_checkpoint(saved, tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "openvla"}))
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="trust_remote_code=True"):
        load_checkpoint(path)
    path = copy_checkpoint(saved, tmp_path / "pickled")
    torch.save(tiny_vla().vlm.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(path)


def test_saving_is_atomic_and_never_replaces_other_folders(saved, tmp_path):
    vla = tiny_vla()
    args = (vla, vla.processor, vla.stats, vla.refinevla_config)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        save_checkpoint(tmp_path / "ck", *args, extra_files={"../escape.txt": "x"})
    assert not (tmp_path / "ck").exists() and list(tmp_path.iterdir()) == []  # no half checkpoint, no temp folder
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a refinevla checkpoint; refusing"):
        save_checkpoint(tmp_path / "mine", *args)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    save_checkpoint(tmp_path / "ck", *args, extra_files={"a.txt": "1"})
    save_checkpoint(tmp_path / "ck", *args)  # replacing a checkpoint is fine
    assert not (tmp_path / "ck" / "a.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "mine"]
    load_checkpoint(tmp_path / "ck")
