"""Inference: a Policy is the model plus input/output transforms (openpi style); PolicyOutput is what it returns."""

from refinevla_core.inference.types import PolicyOutput

__all__ = ["PolicyOutput"]
