"""The policy contract (PolicyOutput, PolicyLike, ...) as inference's consumers import it; defined in
refinevla_core.policy_types, below both model/ and inference/."""

from refinevla_core.policy_types import AttentionPolicy, ClosablePolicy, LateRationale, PolicyLike, PolicyOutput

__all__ = ["AttentionPolicy", "ClosablePolicy", "LateRationale", "PolicyLike", "PolicyOutput"]
