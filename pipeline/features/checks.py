"""What ``vpipe run`` (and ``vpipe predict``'s replay) checks of a features stage before any
stage runs, so that a misspelt model or a missing weights file stops the workflow now instead
of hours later, after the stages before it."""

from __future__ import annotations

from typing import Any

from pipeline.features.options import FeatureOptions


def check_features(opts: FeatureOptions, fetch: bool) -> dict[str, Any] | None:
    """The options and each modality's encoder options (UsageError, exit 2, dry run or not);
    with ``fetch``, also that the titles file reads and that every weights file and model is
    there or can be downloaded now. With ``fetch``, returns the weights' identities as the
    stage records them (``vpipe predict`` compares them with the run's)."""
    from pipeline.features.encoders import check_encoders, plan_identity, resolve_encoders

    check_encoders(opts)
    if not fetch:  # what the stage will read; a dry run (printing commands) reads none of it
        return None
    if opts.text:
        from pipeline.features.text import read_titles

        read_titles(opts.text)  # a bad titles file: exit 2 now, not after earlier stages
    return plan_identity(resolve_encoders(opts))
