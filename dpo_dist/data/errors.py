"""The error of bad preference data, shared by every module of dpo_dist.data (loading, schemas, conversations)."""

from __future__ import annotations

from dpo_dist.util.errors import UserError


class DataError(UserError):
    """Bad preference data: the message names the dataset, the row or column, and the fix."""
