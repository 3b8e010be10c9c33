"""`refinevla attention`: save the action-token attention overlay of a checkpoint on one image (a PNG), from a shell.

    refinevla attention --checkpoint runs/tiny/checkpoint --image frame.png --instruction "push the cube" --out x.png

Prints the action the map explains, the share of attention on the image and the most-attended patch; `--grid-out`
also writes the raw patch-grid array (.npy) for analysis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint folder (save_checkpoint)")
    parser.add_argument("--image", required=True, type=Path, help="an RGB image file (PNG/JPEG) or an HxWx3 .npy")
    parser.add_argument("--instruction", required=True, help="the task in words, e.g. 'push the cube to the target'")
    parser.add_argument("--out", required=True, type=Path, help="where the PNG overlay goes")
    parser.add_argument("--layers", default="last", help="'last' (default), 'all', or indices like '-1' or '0,3'")
    parser.add_argument("--with-rationale", action="store_true",
                        help="rationale_then_action models: generate the rationale before the action first")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity 0..1 (default 0.5)")
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap name (default jet)")
    parser.add_argument("--grid-out", type=Path, default=None, help="also save the patch-grid array here (.npy)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")


def read_image(path: Path) -> np.ndarray:
    """An HxWx3 uint8 RGB array from an image file or .npy (ValueError naming the problem)."""
    if not path.is_file():
        raise ValueError(f"image {path} does not exist")
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path} is not a readable image ({e}); give a PNG/JPEG or an HxWx3 uint8 .npy") from e


def run(args: argparse.Namespace) -> int:
    from refinevla_core.attention import AttentionError, action_attention
    from refinevla_core.model.checkpoint import CheckpointError, load_checkpoint
    from refinevla_core.model.processor_refinevla import ProcessorError

    try:
        image = read_image(args.image)
        model = load_checkpoint(args.checkpoint, device=args.device)
        amap = action_attention(model, image, args.instruction, layers=args.layers,
                                with_rationale=args.with_rationale)
        amap.save_png(args.out, image, alpha=args.alpha, cmap=args.cmap)
    except (ValueError, CheckpointError, ProcessorError, AttentionError) as e:
        print(f"refinevla attention: {e}", file=sys.stderr)
        return 2
    if args.grid_out is not None:
        args.grid_out.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.grid_out, amap.grid)
    row, col = np.unravel_index(int(np.argmax(amap.grid)), amap.grid.shape)
    summary = {
        "out": str(args.out), "grid": list(amap.grid.shape), "layers": amap.layers,
        "action": [round(float(v), 5) for v in amap.action],
        "image_share": round(float(amap.image_share.mean()), 4), "peak_patch": [int(row), int(col)],
        "rationale": amap.rationale_text,
    }
    print(json.dumps(summary, indent=1))
    return 0
