"""Error types shared by the data modules.

A `SkipSample` is raised while turning one record into a training sample; the pipeline
catches it, counts it by `reason`, logs where it came from and moves on. A `DataError`
stops the run (bad config, unreadable meta file, too many bad samples).
"""

from __future__ import annotations

from dataclasses import dataclass

from mini_internvl_jax.errors import UserError

# Reasons a record is rejected as bad input (counted towards `max_bad_fraction`).
BAD_REASONS = (
    "malformed_json",
    "missing_image",
    "corrupt_image",
    "missing_video",
    "corrupt_video",
    "unknown_role",
    "bad_turn_order",
    "placeholder_mismatch",
)
# Reasons a valid record is left out because it does not fit the batch geometry.
DROP_REASONS = ("too_long", "too_many_tiles", "no_targets")


class DataError(UserError, ValueError):
    """A data problem that must stop the run; the message names the file or setting."""


class TokenizerError(DataError):
    """A tokenizer file that cannot serve a template (missing special token, bad file)."""


class SkipSample(Exception):
    """Raised for one record that cannot be used; `reason` is in BAD_REASONS or DROP_REASONS."""

    def __init__(self, reason: str, detail: str):
        if reason not in BAD_REASONS and reason not in DROP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Skipped:
    """What the per-sample stage emits in place of a sample it rejected."""

    reason: str
    detail: str
    source: str
    line: int

    @property
    def is_bad(self) -> bool:
        return self.reason in BAD_REASONS
