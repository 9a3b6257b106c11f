"""The merge post-step's two failures, shared by its modules (sources, verify, publish, merge)."""

from __future__ import annotations

from dpo_dist.util.errors import ArgumentError, UserError


class MergeError(UserError):
    """The merge or its verification failed: the message says what failed and how to fix it (exit 1)."""


class MergeArgumentError(ArgumentError):
    """Bad --checkpoint / --output / --base_model / ... (exit 2)."""
