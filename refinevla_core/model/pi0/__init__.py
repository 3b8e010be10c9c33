"""π0 (transformers' native PI0: PaliGemma backbone + flow-matching action expert) as a second ReFineVLA family.

Files follow LeRobot's policy layout: configuration_pi0.py (what the model is and how it is used),
processor_pi0.py (observations/targets <-> tensors), modeling_pi0.py (joint loss, rationale decoding, chunk sampling),
checkpoint_pi0.py (writing the checkpoint folder; RefineVLAPi0.from_pretrained reads it) and training_pi0.py (what
the trainer asks of a model family). Chunked execution behind Policy.predict is refinevla_core.inference.policy_pi0.
"""

from refinevla_core.model.pi0.configuration_pi0 import PI0_CONFIG_NAME, RefineVLAPi0Config, is_pi0_config_file

__all__ = ["PI0_CONFIG_NAME", "RefineVLAPi0Config", "is_pi0_config_file"]
