"""What the gateway calls: one object holding the experiments and the exposure log.

Wiring (the lead's part) in ``Recommend``::

    assignments, variant = experiments.for_user(user_id)     # the merged Variant
    pipeline.recommend(..., variant=variant)                  # applies its knobs
    response.experiments = [a.label() for a in assignments]  # returned to the client
    experiments.exposed(user_id, assignments, [item ids], request_id)

and in ``IngestEvents``, for each click event: ``experiments.clicked(user_id, [item ids])``
(the arm is recomputed from the hash, so feedback needs no lookup table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from services.experiments.assignment import (
    Assignment,
    Experiment,
    ExperimentSettings,
    Variant,
    assign_all,
    load_experiments,
    merged_variant,
)
from services.experiments.exposures import ExposureLog

DEFAULT_LOG = Path("var") / "experiments" / "exposures.jsonl"


class ExperimentService:
    """Assignment + logging for all configured experiments (no-op when there are none)."""

    def __init__(self, experiments: Sequence[Experiment], log: ExposureLog | None) -> None:
        self.experiments = list(experiments)
        self.log = log

    @classmethod
    def from_settings(cls, settings: ExperimentSettings) -> ExperimentService:
        """Experiments from ``settings.experiments`` (validated: a bad one fails here); the log at
        ``settings.exposure_log`` when that field exists, else ``<var_dir>/experiments/``."""
        experiments = load_experiments(settings)
        path = getattr(settings, "exposure_log", None)
        if path is None:
            var_dir = getattr(settings, "var_dir", None)
            path = Path(var_dir) / "experiments" / "exposures.jsonl" if var_dir else DEFAULT_LOG
        # The log exists even with no experiment running: DeleteUser must still erase what
        # earlier experiments recorded.
        return cls(experiments, ExposureLog(path))

    def for_user(self, user_id: str) -> tuple[list[Assignment], Variant]:
        """The user's arms and their variants merged: what the pipeline applies."""
        assignments = assign_all(self.experiments, user_id)
        return assignments, merged_variant(assignments)

    def exposed(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        item_ids: Sequence[str],
        request_id: str | None = None,
    ) -> None:
        if self.log is not None and assignments and item_ids:
            self.log.record_exposures(user_id, assignments, item_ids, request_id=request_id)

    def clicked(self, user_id: str, item_ids: Sequence[str], event: str = "click") -> None:
        if self.log is not None and item_ids:
            assignments = assign_all(self.experiments, user_id)
            if assignments:
                self.log.record_feedback(user_id, assignments, item_ids, event=event)

    def delete_user(self, user_id: str) -> int:
        """Erase the user's exposure/feedback records (``DeleteUser``)."""
        return self.log.delete_user(user_id) if self.log is not None else 0
