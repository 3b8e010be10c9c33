"""Selective-transfer fine-tuning with the joint loss: ReFineVLA's second stage.

    config.py     TrainConfig (YAML in config/train_<preset>.yaml), checked before any model is built
    freezing.py   which parameters train: vision/projector/embeddings/lower-K layers frozen, new action-token rows
    loss.py       L = L_action + λ_r · L_rationale over separate position masks
    data.py       episode-level train/validation split, rationale dropout, deterministic resumable batch order
    build.py      what a run trains with: the model (preset or checkpoint) frozen, accelerator, optimizer, schedule
    run_folder.py the run's folder: step checkpoints (atomic, resumable after kill -9), resume point, progress
    metrics.py    validation metrics, metrics.json helpers, the loss-curve PNG
    fsdp.py       FSDP through accelerate (full fine-tuning across processes), the gathered checkpoint export
    trainer.py    the loop: setup, steps, validation, checkpoints, metrics (`train(config)`)
    cli.py        `refinevla train --config config/train_<preset>.yaml [key=value ...]`

Importing this package stays light (no torch): `refinevla --help` imports the CLI module of every stage.
"""
