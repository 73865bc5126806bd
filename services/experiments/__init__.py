"""A/B experiments: deterministic arm assignment, exposure/feedback log, report, replay.

* :mod:`.assignment` - experiments from settings (JSON), ``assign(experiment, user_id)``;
* :mod:`.exposures` - append-only JSONL log of exposures and clicks, with the arm;
* :mod:`.report` - per-arm CTR, lift, 95% CI, p-value (``python -m services.experiments.report``);
* :mod:`.replay` - held-out interactions turned into simulated traffic, end to end;
* :mod:`.runtime` - :class:`ExperimentService`, what the gateway calls.
"""

from services.experiments.assignment import (
    Arm,
    Assignment,
    Experiment,
    ExperimentConfigError,
    Variant,
    assign,
    assign_all,
    load_experiments,
    parse_experiments,
)
from services.experiments.exposures import ExposureLog
from services.experiments.runtime import ExperimentService

__all__ = [
    "Arm",
    "Assignment",
    "Experiment",
    "ExperimentConfigError",
    "ExperimentService",
    "ExposureLog",
    "Variant",
    "assign",
    "assign_all",
    "load_experiments",
    "parse_experiments",
]
