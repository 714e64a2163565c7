"""Policies in gin: `Policy` is configurable, and `policies.extra` adds named policies
(gin/policies/*.gin) to the built-in ones. Kept out of `modes.py`, which stays gin-free."""

import gin

from prealign_jax import modes

gin.external_configurable(modes.Policy, "Policy")


@gin.configurable
def policies(extra: tuple = ()) -> dict[str, modes.Policy]:
    """The built-in policies plus `extra` ones defined in gin."""
    return {**modes.POLICIES, **{p.name: p for p in extra}}
