"""The launcher's check of the ranks' `--report_to`: a tracker that is not installed is refused before the run dir is
written and before any rank starts (the ranks check it again, dpo_dist.args.validate). The rule is the ranks' own
(dpo_dist.util.tracking.check_report_to); this only finds the value: after `--`, else in the `--config` recipe."""

from __future__ import annotations

from dpo_dist.util.errors import ArgumentError
from dpo_dist.util.tracking import check_report_to
from launch.flags import rank_flag


def rank_report_to(extra: list[str]) -> str | None:
    """The ranks' --report_to: given after `--`, else the recipe's `report_to`, else None (the ranks' default)."""
    value = rank_flag(extra, "--report_to")
    if value is not None:
        return value
    recipe = rank_flag(extra, "--config")
    if not recipe:
        return None
    import yaml

    try:
        with open(recipe) as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return None  # the ranks say what is wrong with the recipe, with their own message
    value = data.get("report_to") if isinstance(data, dict) else None
    return None if value is None else str(value)


def check_rank_trackers(extra: list[str]) -> None:
    """ArgumentError (naming the pip package) when the ranks' --report_to names a tracker this Python lacks."""
    value = rank_report_to(extra)
    if value is not None:
        try:
            check_report_to(value)
        except ArgumentError as e:
            raise ArgumentError(f"{e} (flags for the ranks go after `--`)") from None
