"""Attention maps of the action tokens over the image patches: shape = patch grid, rows are softmax distributions,
the right query/key positions are read (checked against a layer whose attention is known to be uniform), the PNG
overlay, and the `refinevla attention` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from refinevla_core.attention import AttentionError, AttentionMap, action_attention, resolve_layers
from refinevla_core.cli import main
from refinevla_core.model.checkpoint import save_checkpoint
from test.core.model_util import INSTRUCTION, example_image, tiny_vla


def test_map_shape_is_the_patch_grid_and_rows_sum_to_one():
    vla = tiny_vla()
    amap = action_attention(vla, example_image(), INSTRUCTION, layers="all")
    assert amap.grid.shape == (8, 8) and amap.per_action.shape == (7, 8, 8)  # 112 px / patch 14
    np.testing.assert_allclose(amap.row_sums, 1.0, atol=1e-5)  # each full row is a softmax
    assert ((amap.image_share > 0) & (amap.image_share <= 1.0 + 1e-6)).all()
    np.testing.assert_allclose(amap.per_action.reshape(7, -1).sum(1), amap.image_share, rtol=1e-5)
    np.testing.assert_allclose(amap.grid, amap.per_action.mean(0), rtol=1e-6)
    assert amap.normalized.sum() == pytest.approx(1.0) and amap.layers == [0, 1, 2, 3]
    assert amap.action.shape == (7,)


@pytest.mark.parametrize("with_rationale", [False, True])
def test_queries_and_patches_are_the_right_positions(with_rationale):
    """Zero one layer's query projection: its attention is then uniform over every visible position, so the query
    at sequence position q gives exactly 1 / (q + 1) to each image patch. Any off-by-one in the query positions
    (those predicting a1..a7) or in the patch columns shows up here."""
    vla = tiny_vla(fresh=True)
    layer = vla.vlm.model.language_model.layers[2]
    with torch.no_grad():
        layer.self_attn.q_proj.weight.zero_()
    amap = action_attention(vla, example_image(), INSTRUCTION, layers=[2], with_rationale=with_rationale,
                            max_rationale_tokens=5)
    length = amap.meta["sequence_length"]
    query_positions = np.arange(length - 8, length - 1)
    expected = 1.0 / (query_positions + 1)
    np.testing.assert_allclose(amap.per_action, np.broadcast_to(expected[:, None, None], (7, 8, 8)), rtol=1e-5)
    np.testing.assert_allclose(amap.image_share, 64 * expected, rtol=1e-5)
    assert length == len(vla.processor.prefix_ids(INSTRUCTION)) + 8 + amap.meta["rationale_tokens"]
    assert (amap.meta["rationale_tokens"] > 0) == with_rationale  # the rationale came before the action


def test_layer_choice():
    assert resolve_layers("last", 4) == [3] and resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("-1,0", 4) == [0, 3] and resolve_layers(1, 4) == [1]
    with pytest.raises(AttentionError, match="has 4 layers"):
        resolve_layers([4], 4)
    with pytest.raises(AttentionError, match="'last', 'all' or indices"):
        resolve_layers("top", 4)
    vla = tiny_vla()
    last = action_attention(vla, example_image(), INSTRUCTION, layers="last")
    first = action_attention(vla, example_image(), INSTRUCTION, layers=[0])
    assert not np.allclose(last.grid, first.grid)


def test_overlay_puts_the_hot_colour_where_the_attention_is(tmp_path):
    grid = np.zeros((8, 8), np.float32)
    grid[0, 0] = 1.0  # all attention on the top-left patch
    amap = AttentionMap(grid=grid, per_action=np.stack([grid] * 7), image_share=np.ones(7), row_sums=np.ones(7),
                        layers=[3], action=np.zeros(7, np.float32))
    image = np.full((90, 120, 3), 128, np.uint8)
    path = amap.save_png(tmp_path / "x.png", image, alpha=0.6)
    with Image.open(path) as img:
        png = np.asarray(img)
    assert png.shape == (90, 120, 3)
    top_left, bottom_right = png[2, 2].astype(int), png[-3, -3].astype(int)
    assert top_left[0] > top_left[2] and bottom_right[2] > bottom_right[0]  # jet: red = hot, blue = cold
    with pytest.raises(AttentionError, match="alpha"):
        amap.overlay(image, alpha=2.0)


def test_refinevla_attention_command(tmp_path, capsys):
    vla = tiny_vla()
    ck = save_checkpoint(tmp_path / "ck", vla, vla.processor, vla.stats, vla.refinevla_config)
    Image.fromarray(example_image(5, (96, 128))).save(tmp_path / "frame.png")
    rc = main(["attention", "--checkpoint", str(ck), "--image", str(tmp_path / "frame.png"), "--instruction",
               INSTRUCTION, "--out", str(tmp_path / "out" / "att.png"), "--layers", "all",
               "--grid-out", str(tmp_path / "grid.npy")])
    assert rc == 0
    with Image.open(tmp_path / "out" / "att.png") as png:
        assert png.size == (128, 96)
    assert np.load(tmp_path / "grid.npy").shape == (8, 8)
    assert '"grid": [\n  8,\n  8\n ]' in capsys.readouterr().out
    (tmp_path / "bad.png").write_text("not an image")
    rc = main(["attention", "--checkpoint", str(ck), "--image", str(tmp_path / "bad.png"), "--instruction", "x",
               "--out", str(tmp_path / "y.png")])
    assert rc == 2 and "not a readable image" in capsys.readouterr().err
    rc = main(["attention", "--checkpoint", str(tmp_path / "none"), "--image", str(tmp_path / "frame.png"),
               "--instruction", "x", "--out", str(tmp_path / "y.png")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_policy_attention_overlay_is_the_maps_overlay_for_the_last_instruction():
    """What policy_node publishes on /refinevla/attention_overlay when publish_attention is on."""
    from refinevla_core.inference.policy import Policy, PolicyConfig

    model = tiny_vla()
    policy = Policy(model, PolicyConfig(rationale_mode="action_only"))
    image = example_image()
    with pytest.raises(ValueError, match="needs an instruction"):
        policy.attention_overlay(image)
    policy.predict(image, INSTRUCTION)
    overlay = policy.attention_overlay(image)
    expected = np.asarray(action_attention(model, image, INSTRUCTION).overlay(image))
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    np.testing.assert_array_equal(overlay, expected)
