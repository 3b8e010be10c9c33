"""Selective-transfer fine-tuning with the joint loss: ReFineVLA's second stage.

    config.py     TrainConfig (YAML in config/train_<preset>.yaml), checked before any model is built
    freezing.py   which parameters train: vision/projector/embeddings/lower-K layers frozen, new action-token rows
    loss.py       L = L_action + λ_r · L_rationale over separate position masks
    data.py       episode-level train/validation split, rationale dropout, deterministic resumable batch order
    trainer.py    the accelerate loop: checkpoints (atomic, resumable after kill -9), validation, metrics, curves
    cli.py        `refinevla train --config config/train_<preset>.yaml [key=value ...]`

Importing this package stays light (no torch): `refinevla --help` imports the CLI module of every stage.
"""
