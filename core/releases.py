"""How a model release is named on Triton: the contract between the exporter that writes a
release (``training.export``) and the gateway's client that pins one (``services.inference``).

Triton reads one ``config.pbtxt`` per model, not per version, so an ensemble whose steps say
``model_version: -1`` always runs the newest steps. Each release therefore also gets its own
ensembles, ``<ensemble>_r<N>``, whose steps are pinned to release N's versions.
"""

from __future__ import annotations


def pinned_model_name(ensemble: str, version: int | str) -> str:
    """The ensemble of one release: ``ranker_scorer`` of release 7 is ``ranker_scorer_r7``."""
    return f"{ensemble}_r{version}"
