"""A/B experiments: deterministic arm assignment, exposure/feedback log, report, replay.

* :mod:`.assignment` - experiments from settings (JSON), ``assign(experiment, user_id)``, and
  :class:`Variant`, the knobs an arm changes, which the recommendation pipeline takes as is;
* :mod:`.exposures` - exposures and clicks with the arm: the JetStream exposures stream (what
  the gateway writes) or an append-only JSONL file;
* :mod:`.report` - per-arm CTR, lift, 95% CI, p-value (``python -m services.experiments.report``);
* :mod:`.runtime` - :class:`ExperimentService`, what the gateway calls.

The simulated replay of held-out interactions lives in :mod:`ops.ab_replay` (it needs the
offline systems).
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
