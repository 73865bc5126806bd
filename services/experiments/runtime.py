"""What the gateway calls: one object holding the experiments and the exposure log.

Wiring (the lead's part) in ``Recommend``::

    assignments, variant = experiments.for_user(user_id)     # the merged Variant
    pipeline.recommend(..., variant=variant)                  # applies its knobs
    response.experiments = [a.label() for a in assignments]  # returned to the client
    experiments.exposed(user_id, assignments, [item ids], request_id, surface, device)

and in ``IngestEvents``, for each click event: ``experiments.clicked(user_id, [item ids],
recommendation_id=...)`` (the arm is recomputed from the hash, so feedback needs no lookup
table; the recommendation id, when the click carries one, is what the report joins on).

Records go to the JetStream exposures stream (``exposure_sink=stream``, the default: every
replica's in one place) or to the JSONL file ``exposure_log`` (``exposure_sink=file``).
With ``exposure_logging=all`` a response to a user in no experiment is logged too, under no
experiment (:data:`UNASSIGNED`): what the feature ranker trains on from an export, which the
A/B report leaves out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from services.events.log import BlockingEventLog
from services.experiments.assignment import (
    Assignment,
    Experiment,
    ExperimentSettings,
    Variant,
    assign_all,
    load_experiments,
    merged_variant,
)
from services.experiments.exposures import ExposureLog, ExposureStream

DEFAULT_LOG = Path("var") / "experiments" / "exposures.jsonl"
#: the "assignment" of a response logged outside every experiment (``exposure_logging=all``)
UNASSIGNED = Assignment("", "", Variant())


class ExposureSink(Protocol):
    """Where exposures and feedback go: :class:`ExposureStream` or :class:`ExposureLog`."""

    def record_exposures(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        items: Sequence[str],
        *,
        ts: float | None = None,
        request_id: str | None = None,
        surface: str = "",
        device: str = "",
    ) -> None: ...

    def record_feedback(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        item_ids: Sequence[str],
        *,
        event: str = "click",
        ts: float | None = None,
        recommendation_id: str | None = None,
    ) -> None: ...

    def delete_user(self, user_id: str) -> int: ...


class ExperimentService:
    """Assignment + logging for all configured experiments (no-op when there are none)."""

    def __init__(
        self, experiments: Sequence[Experiment], log: ExposureSink | None, log_all: bool = False
    ) -> None:
        self.experiments = list(experiments)
        self.log = log
        self.log_all = log_all  # responses to users in no experiment are logged too

    @classmethod
    def from_settings(
        cls, settings: ExperimentSettings, events: BlockingEventLog | None = None
    ) -> ExperimentService:
        """Experiments from ``settings.experiments`` (validated: a bad one fails here).

        ``exposure_sink=stream``: records go to the exposures stream through ``events`` (the
        gateway's event log; one of its own when not given). Otherwise (and for settings
        without that field) the file ``settings.exposure_log`` when that field exists, else
        ``<var_dir>/experiments/``."""
        experiments = load_experiments(settings)
        log_all = getattr(settings, "exposure_logging", "experiments") == "all"
        if getattr(settings, "exposure_sink", "file") == "stream":
            if not experiments and not log_all:  # nothing to record; DeleteUser needs none
                return cls(experiments, None)
            full = cast(Any, settings)  # a core.config.Settings: the log needs all of it
            return cls(experiments, ExposureStream(events or BlockingEventLog(full)), log_all)
        path = getattr(settings, "exposure_log", None)
        if path is None:
            var_dir = getattr(settings, "var_dir", None)
            path = Path(var_dir) / "experiments" / "exposures.jsonl" if var_dir else DEFAULT_LOG
        # The log exists even with no experiment running: DeleteUser must still erase what
        # earlier experiments recorded.
        return cls(experiments, ExposureLog(path), log_all)

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
        surface: str = "",
        device: str = "",
    ) -> None:
        """Record that the user (in ``assignments``) was shown ``item_ids`` on ``surface``
        and ``device`` (the request's context; empty when it sent none); a user in no
        experiment only when every response is logged (:data:`UNASSIGNED`)."""
        recorded = list(assignments) or ([UNASSIGNED] if self.log_all else [])
        if self.log is not None and recorded and item_ids:
            self.log.record_exposures(
                user_id,
                recorded,
                item_ids,
                request_id=request_id,
                surface=surface,
                device=device,
            )

    def clicked(
        self,
        user_id: str,
        item_ids: Sequence[str],
        event: str = "click",
        recommendation_id: str | None = None,
    ) -> None:
        """Feedback on ``item_ids``; ``recommendation_id`` (the ``Event``'s, when the client
        sent it) is the exposure's ``request_id`` it follows, for an exact join."""
        if self.log is not None and item_ids:
            assignments = assign_all(self.experiments, user_id)
            if assignments:
                self.log.record_feedback(
                    user_id,
                    assignments,
                    item_ids,
                    event=event,
                    recommendation_id=recommendation_id or None,
                )

    def delete_user(self, user_id: str) -> int:
        """Erase the user's exposure/feedback records (``DeleteUser``; on the stream, the
        event log's ``forget_user`` has purged them already)."""
        return self.log.delete_user(user_id) if self.log is not None else 0

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait for records still being published (stream sink); True when all were."""
        return self.log.flush(timeout) if isinstance(self.log, ExposureStream) else True
