"""Experiments defined in settings and deterministic, sticky arm assignment.

Configuration is a JSON list, read only through the settings (``Settings.experiments``, env
``RECSYS_EXPERIMENTS``)::

    [{"name": "mmr", "salt": "s1",
      "arms": [{"name": "control",   "weight": 50, "variant": {"mmr_lambda": 0.0}},
               {"name": "treatment", "weight": 50, "variant": {"mmr_lambda": 0.3}}]}]

Optional per experiment: ``"control"`` (the baseline arm's name; default the arm called
``control``, else the first arm) and ``"enabled"`` (default true). A variant may set
``model_version`` (Triton release to pin), ``retrieval_mix`` (gateway source -> weight, the
sources of :data:`core.config.RETRIEVAL_SOURCES`) and ``mmr_lambda`` (0 = pure relevance);
anything else, an unknown source name included, is rejected so a typo cannot silently run
an experiment that changes nothing. The parsed :class:`Variant` is what the pipeline takes.

Assignment: ``bucket = int(sha256(f"{salt}:{user_id}")[:16 hex], 16) % 10000``; arm ``i``
owns the buckets ``[B_i, B_{i+1})`` with ``B_i`` the rounded cumulative weight share. It
needs no state, so it is sticky across requests, processes and restarts; changing the salt
reshuffles everyone, changing weights moves only users in the shifted bucket ranges.
Experiments with different salts are independent of each other. Two enabled experiments
may not set the same variant field (their effects could not be told apart).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

from core.config import check_retrieval_mix

BUCKETS = 10_000


class ExperimentConfigError(ValueError):
    """The experiments setting is not valid."""


@dataclass(frozen=True)
class Variant:
    """The pipeline knobs an arm may change; ``None`` = keep the serving default.

    One type from the configuration to the pipeline: parsed (and validated) here, merged
    over a user's arms, then read by the recommendation stages.
    """

    model_version: str | None = None  # ranker release on Triton
    retrieval_mix: Mapping[str, float] | None = None  # gateway source -> fusion weight
    mmr_lambda: float | None = None

    def set_fields(self) -> dict[str, Any]:
        """Only the fields this variant overrides."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def merge(cls, variants: Iterable[Variant]) -> Variant:
        """All overrides together (parsing guarantees that no two set the same field)."""
        out = cls()
        for variant in variants:
            out = replace(out, **variant.set_fields())
        return out

    @classmethod
    def parse(cls, raw: object, where: str) -> Variant:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ExperimentConfigError(f"{where}: variant must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExperimentConfigError(
                f"{where}: unknown variant field(s) {unknown}; allowed: {sorted(known)}"
            )
        mv = raw.get("model_version")
        if mv is not None and not isinstance(mv, str | int):
            raise ExperimentConfigError(f"{where}.model_version must be a string")
        mix = raw.get("retrieval_mix")
        if mix is not None:
            if not isinstance(mix, dict) or not mix:
                raise ExperimentConfigError(f"{where}.retrieval_mix must be a non-empty object")
            for k, v in mix.items():
                if not _is_number(v) or v < 0:
                    raise ExperimentConfigError(f"{where}.retrieval_mix[{k!r}] must be >= 0")
            try:
                mix = check_retrieval_mix(
                    {str(k): float(v) for k, v in mix.items()}, f"{where}.retrieval_mix"
                )
            except ValueError as exc:  # an unknown source, named in the message
                raise ExperimentConfigError(str(exc)) from exc
        lam = raw.get("mmr_lambda")
        if lam is not None and (not _is_number(lam) or not 0.0 <= lam <= 1.0):
            raise ExperimentConfigError(f"{where}.mmr_lambda must be a number in [0, 1]")
        return cls(
            model_version=None if mv is None else str(mv),
            retrieval_mix=mix,
            mmr_lambda=None if lam is None else float(lam),
        )


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Arm:
    name: str
    weight: float
    variant: Variant = field(default_factory=Variant)


@dataclass(frozen=True)
class Experiment:
    """One experiment; ``bounds[i]`` is the first bucket *after* arm ``i``."""

    name: str
    salt: str
    arms: tuple[Arm, ...]
    control: str
    enabled: bool = True
    bounds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.bounds:
            total = sum(a.weight for a in self.arms)
            acc, bounds = 0.0, []
            for a in self.arms:
                acc += a.weight
                bounds.append(round(acc / total * BUCKETS))
            bounds[-1] = BUCKETS
            object.__setattr__(self, "bounds", tuple(bounds))

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"experiment {self.name!r} has no arm {name!r}")


@dataclass(frozen=True)
class Assignment:
    """An arm for one user in one experiment (what a response reports)."""

    experiment: str
    arm: str
    variant: Variant

    def label(self) -> str:
        """``"experiment=arm"``, e.g. for a response field or log line."""
        return f"{self.experiment}={self.arm}"


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in ``[0, BUCKETS)``: sha256 of ``"salt:user_id"``."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).hexdigest()
    return int(digest[:16], 16) % BUCKETS


def assign(experiment: Experiment, user_id: str) -> Arm:
    """The user's arm: deterministic in ``(salt, user_id, weights)``, so sticky."""
    b = bucket(experiment.salt, user_id)
    for arm, bound in zip(experiment.arms, experiment.bounds, strict=True):
        if b < bound:
            return arm
    return experiment.arms[-1]  # unreachable: the last bound is BUCKETS


def assign_all(experiments: Sequence[Experiment], user_id: str) -> list[Assignment]:
    """Assignments in every enabled experiment, in configuration order."""
    out = []
    for exp in experiments:
        if exp.enabled:
            arm = assign(exp, user_id)
            out.append(Assignment(exp.name, arm.name, arm.variant))
    return out


def merged_variant(assignments: Sequence[Assignment]) -> Variant:
    """The overrides of all assignments together (fields never overlap, see parsing)."""
    return Variant.merge(a.variant for a in assignments)


def parse_experiments(raw: str | list[Any] | None) -> list[Experiment]:
    """Validate the JSON setting into :class:`Experiment` objects (empty -> none)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return []
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise ExperimentConfigError(f"experiments: invalid JSON: {exc}") from exc
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ExperimentConfigError("experiments: expected a JSON list of experiments")
    out: list[Experiment] = []
    names: set[str] = set()
    owner: dict[str, str] = {}
    for n, e in enumerate(data):
        where = f"experiments[{n}]"
        if not isinstance(e, dict):
            raise ExperimentConfigError(f"{where}: expected an object")
        name, salt = e.get("name"), e.get("salt")
        if not isinstance(name, str) or not name.strip():
            raise ExperimentConfigError(f"{where}.name must be a non-empty string")
        if name in names:
            raise ExperimentConfigError(f"{where}: duplicate experiment name {name!r}")
        names.add(name)
        if not isinstance(salt, str) or not salt:
            raise ExperimentConfigError(f"{where}.salt must be a non-empty string")
        raw_arms = e.get("arms")
        if not isinstance(raw_arms, list) or len(raw_arms) < 2:
            raise ExperimentConfigError(f"{where}.arms must list at least two arms")
        arms: list[Arm] = []
        for m, a in enumerate(raw_arms):
            aw = f"{where}.arms[{m}]"
            if not isinstance(a, dict):
                raise ExperimentConfigError(f"{aw}: expected an object")
            an, weight = a.get("name"), a.get("weight", 1)
            if not isinstance(an, str) or not an.strip():
                raise ExperimentConfigError(f"{aw}.name must be a non-empty string")
            if any(x.name == an for x in arms):
                raise ExperimentConfigError(f"{aw}: duplicate arm name {an!r}")
            if not _is_number(weight) or weight < 0:
                raise ExperimentConfigError(f"{aw}.weight must be a number >= 0")
            arms.append(Arm(an, float(weight), Variant.parse(a.get("variant"), f"{aw}.variant")))
        if sum(a.weight for a in arms) <= 0:
            raise ExperimentConfigError(f"{where}: arm weights sum to 0")
        control = e.get("control")
        if control is None:
            control = "control" if any(a.name == "control" for a in arms) else arms[0].name
        if not any(a.name == control for a in arms):
            raise ExperimentConfigError(f"{where}.control {control!r} is not an arm")
        enabled = e.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ExperimentConfigError(f"{where}.enabled must be true or false")
        exp = Experiment(name, salt, tuple(arms), control, enabled)
        if enabled:
            for key in {k for a in arms for k in a.variant.set_fields()}:
                if key in owner:
                    raise ExperimentConfigError(
                        f"{where}: variant field {key!r} is already varied by experiment "
                        f"{owner[key]!r}; run them one after the other or as one experiment"
                    )
                owner[key] = name
        out.append(exp)
    return out


class ExperimentSettings(Protocol):
    """What experiments need of the settings (:class:`core.config.Settings` has it)."""

    @property
    def experiments(self) -> str: ...


def load_experiments(settings: ExperimentSettings) -> list[Experiment]:
    """Experiments from ``settings.experiments``: the settings object is the one way in, so
    the environment variable is read (and overridden) where every other setting is."""
    return parse_experiments(settings.experiments)
