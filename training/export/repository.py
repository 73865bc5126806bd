"""Write exported models into the Triton model repository as new numbered versions.

One export is one *release*: every model it touches gets the same new version number
(one above the highest in the repository), so the tokenizer, towers and ranker of a training
run travel together, and ``version_policy { latest { num_versions: 2 } }`` keeps the previous
release loaded for rollback. A version directory is assembled under a temporary name and
renamed into place, so a Triton polling the repository never sees half a model.

Rollback needs more than the composing models' versions: an ensemble step names one
``model_version``, Triton reads one ``config.pbtxt`` per model (not per version), and with
``-1`` every version of an ensemble runs the *newest* tokenizer, encoder and ranker, so
pinning ``ranker_scorer`` to N-1 would still score with release N. Each release therefore also
gets its own ensembles, ``<ensemble>_r<N>`` (:func:`pinned_model_name`): a copy of the tracked
ensemble config with every step's ``model_version`` set to the version of that step in release
N, served as version N of that model. The tracked ensembles keep ``-1`` and serve "latest";
a pinned client (``RECSYS_TRITON_MODEL_VERSION=N``, an experiment arm's ``model_version``)
calls ``<ensemble>_r<N>``. A pinned ensemble exists only while Triton keeps every step
version it names loaded (the steps' version policies); older ones are retired at export.

Tracked sources per model (``config.pbtxt``, ``configs/gpu.pbtxt``, ``model.py``) stay as they
are; the python-backend ``model.py`` is copied into each version, where Triton looks for it.
Generated: the numbered version directories and the ``<ensemble>_r<N>`` models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.releases import pinned_model_name

TOWERS = ("item", "user")
# The item tower's int8 graph (training.export.quantize), beside its model.onnx in every
# release; the CPU item_encoder serves it when its config's onnx_file names it.
INT8_GRAPH = "model.int8.onnx"
ENSEMBLES = {"item_embedder", "user_embedder", "ranker_scorer"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def versions(model_dir: Path) -> list[int]:
    """Numbered version directories of one model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_release(repository: Path) -> int:
    """Highest version number of any model in the repository (0 when empty)."""
    found = [v for d in repository.iterdir() if d.is_dir() for v in versions(d)]
    return max(found, default=0)


def servable_models(repository: Path) -> list[str]:
    """Models that have a config and at least one version: what Triton should load. A pinned
    ensemble whose step versions Triton would not load is left out (it cannot load)."""
    return sorted(
        d.name
        for d in repository.iterdir()
        if d.is_dir()
        and (d / "config.pbtxt").is_file()
        and versions(d)
        and (pinned_release(d.name) is None or pinned_servable(repository, d.name))
    )


# --- per-release ("pinned") ensembles -------------------------------------------------------
_PINNED = re.compile(r"(?P<ensemble>.+)_r(?P<version>[0-9]+)")
_NAME = re.compile(r'^name:\s*"[^"]*"', re.MULTILINE)
_STEP = re.compile(r'model_name:\s*"(?P<model>[^"]+)"\s*model_version:\s*(?P<version>-?[0-9]+)')
_POLICY = r"version_policy\s*:?\s*\{{\s*{kind}\s*:?\s*\{{"
_LATEST = re.compile(_POLICY.format(kind="latest") + r"\s*num_versions\s*:\s*([0-9]+)")
_ALL = re.compile(_POLICY.format(kind="all"))
_SPECIFIC = re.compile(_POLICY.format(kind="specific") + r"\s*versions\s*:\s*\[?([0-9,\s]+)")


def pinned_release(model: str) -> int | None:
    """The release a pinned ensemble's name stands for; ``None`` for any other model."""
    match = _PINNED.fullmatch(model)
    if match is None or match["ensemble"] not in ENSEMBLES:
        return None
    return int(match["version"])


def ensemble_steps(config: str) -> list[tuple[str, int]]:
    """``(model_name, model_version)`` of each step of an ensemble config."""
    body = "".join(
        line for line in config.splitlines(keepends=True) if not line.lstrip().startswith("#")
    )
    steps = [(m["model"], int(m["version"])) for m in _STEP.finditer(body)]
    if len(steps) != body.count("model_name:"):
        raise ValueError("every ensemble step must give model_version right after model_name")
    return steps


def loaded_versions(model_dir: Path, adding: Sequence[int] = ()) -> list[int]:
    """The versions Triton loads for a model under its ``config.pbtxt``'s ``version_policy``
    (Triton's default: the newest one), of those on disk plus ``adding``."""
    on_disk = sorted(set(versions(model_dir)) | set(adding))
    config = model_dir / "config.pbtxt"
    text = config.read_text() if config.is_file() else ""
    if _ALL.search(text):
        return on_disk
    specific = _SPECIFIC.search(text)
    if specific:
        wanted = {int(v) for v in re.findall(r"[0-9]+", specific[1])}
        return [v for v in on_disk if v in wanted]
    latest = _LATEST.search(text)
    count = int(latest[1]) if latest else 1
    return on_disk[-count:] if count > 0 else []


def pinned_servable(
    repository: Path, model: str, incoming: Mapping[str, int] | None = None
) -> bool:
    """Whether Triton would load every step version the pinned ensemble ``model`` names,
    also once the ``incoming`` versions (model -> version about to be committed) are in."""
    config = repository / model / "config.pbtxt"
    if not config.is_file():
        return False
    for step, version in ensemble_steps(config.read_text()):
        adding = [incoming[step]] if incoming and step in incoming else []
        loaded = loaded_versions(repository / step, adding)
        if not loaded or (version != -1 and version not in loaded):
            return False
    return True


def retire(pinned_dir: Path) -> Path:
    """Remove a pinned ensemble so that a polling Triton sees it vanish at once: renamed
    out of the repository's top level (into its ensemble's directory, where Triton reads
    only numbered entries), then deleted."""
    match = _PINNED.fullmatch(pinned_dir.name)
    if match is None or pinned_release(pinned_dir.name) is None:
        raise ValueError(f"{pinned_dir} is not a pinned ensemble")
    parent = pinned_dir.parent / match["ensemble"]
    hidden = parent / f".retired-{pinned_dir.name}-{os.getpid()}-{time.monotonic_ns()}"
    pinned_dir.rename(hidden)
    shutil.rmtree(hidden)
    return pinned_dir


def retire_pinned(repository: Path, incoming: Mapping[str, int] | None = None) -> list[Path]:
    """Retire the pinned ensembles Triton will no longer load (a step version left the
    steps' version policy window, e.g. once ``incoming`` versions are committed, or was
    pruned): an unloadable model in the repository is an error to Triton."""
    return [
        retire(d)
        for d in sorted(repository.iterdir())
        if d.is_dir()
        and pinned_release(d.name) is not None
        and not pinned_servable(repository, d.name, incoming)
    ]


def render_pinned(template: str, name: str, release: int, step_versions: Mapping[str, int]) -> str:
    """The tracked ensemble ``template`` as model ``name`` with each step's ``model_version``
    set from ``step_versions`` (steps the template already pins keep their version)."""
    if len(_NAME.findall(template)) != 1:
        raise ValueError(f"ensemble config for {name} needs exactly one top-level name")

    def pin(match: re.Match[str]) -> str:
        if int(match["version"]) != -1:
            return match[0]
        head = match[0][: match.start("version") - match.start()]
        return f"{head}{step_versions[match['model']]}"

    ensemble_steps(template)  # validates the step layout
    lines = template.splitlines(keepends=True)
    comments = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    purpose = lines[:1] if comments else []  # the template's first line says what it does
    body = _STEP.sub(pin, _NAME.sub(f'name: "{name}"', "".join(lines[comments:]), count=1))
    header = (
        f"# GENERATED by training.export for release {release}; do not edit. The tracked\n"
        "# ensemble config with every step pinned to its version in this release, so that a\n"
        f"# client pinned to release {release} (RECSYS_TRITON_MODEL_VERSION) runs exactly it.\n"
    )
    return "".join(purpose) + header + body


@dataclass
class Release:
    """A new version being assembled; ``commit`` moves every staged model into place."""

    repository: Path
    version: int
    staged: dict[str, Path] = field(default_factory=dict)
    pinned: dict[str, Path] = field(default_factory=dict)  # ensemble -> staged pinned model

    def stage(self, model: str) -> Path:
        """A fresh staging directory for ``model``'s new version, with its model.py."""
        model_dir = self.repository / model
        if not (model_dir / "config.pbtxt").is_file():
            raise FileNotFoundError(f"{model_dir}/config.pbtxt is missing: not a model")
        staging = model_dir / f".staging-{self.version}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        source = model_dir / "model.py"
        if source.exists():
            shutil.copyfile(source.resolve(), staging / "model.py")
        self.staged[model] = staging
        return staging

    def step_versions(self, ensemble: str) -> dict[str, int] | None:
        """Each step's version in this release: its new version when the release has it,
        else its newest older one; ``None`` when a step has no version at all."""
        template = (self.repository / ensemble / "config.pbtxt").read_text()
        out = {}
        for model, _ in ensemble_steps(template):
            if model in self.staged:
                out[model] = self.version
                continue
            older = [v for v in versions(self.repository / model) if v < self.version]
            if not older:
                return None
            out[model] = older[-1]
        return out

    def stage_pinned(self, ensemble: str, metadata: dict[str, object]) -> Path | None:
        """Assemble ``<ensemble>_r<N>`` inside the ensemble's directory (Triton reads only
        numbered entries there); ``None`` when a step has no version to pin."""
        steps = self.step_versions(ensemble)
        if steps is None:
            return None
        name = pinned_model_name(ensemble, self.version)
        staging = self.repository / ensemble / f".pinned-{self.version}"
        if staging.exists():
            shutil.rmtree(staging)
        (staging / str(self.version)).mkdir(parents=True)
        template = (self.repository / ensemble / "config.pbtxt").read_text()
        (staging / "config.pbtxt").write_text(render_pinned(template, name, self.version, steps))
        (staging / str(self.version) / "release.json").write_text(
            json.dumps(
                {"version": self.version, "model": name, "steps": steps, **metadata}, indent=2
            )
        )
        self.pinned[ensemble] = staging
        return staging

    def commit(self, metadata: dict[str, object]) -> dict[str, int]:
        """Rename every staged directory to its version number, in an order a polling Triton
        can follow: retire the pinned ensembles this release makes unloadable, then the
        composing models, then this release's pinned ensembles, then the ensembles."""
        order = sorted(self.staged, key=lambda m: m in ENSEMBLES)
        for ensemble in (m for m in order if m in ENSEMBLES):
            self.stage_pinned(ensemble, metadata)
        incoming = {m: self.version for m in order if m not in ENSEMBLES}
        retire_pinned(self.repository, incoming)
        for model in order:
            if model in ENSEMBLES and model in self.pinned:
                target = self.repository / pinned_model_name(model, self.version)
                if target.exists():  # left by an export of the same number that failed
                    retire(target)
                self.pinned.pop(model).rename(target)
            staging = self.staged[model]
            (staging / "release.json").write_text(
                json.dumps({"version": self.version, "model": model, **metadata}, indent=2)
            )
            staging.rename(self.repository / model / str(self.version))
        return {m: self.version for m in order}

    def abort(self) -> None:
        """Delete every staging directory (nothing of the release becomes visible)."""
        for staging in [*self.staged.values(), *self.pinned.values()]:
            shutil.rmtree(staging, ignore_errors=True)
        self.pinned.clear()


def new_release(repository: Path) -> Release:
    """Start the next release of the repository."""
    return Release(repository, latest_release(repository) + 1)


def copy_tokenizer(source_dir: str, target: Path) -> None:
    """Copy the fast-tokenizer files the python-backend tokenizer loads."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, target / name)
    if not (target / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{source_dir} has no tokenizer.json (a fast tokenizer is needed)")


def prune(repository: Path, keep: int = 3) -> list[Path]:
    """Delete all but the newest ``keep`` versions of each model (disk hygiene), and the
    pinned ensembles whose step versions are gone or no longer loaded."""
    removed = []
    for model_dir in repository.iterdir():
        for v in versions(model_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(model_dir / str(v))
            removed.append(model_dir / str(v))
    return removed + retire_pinned(repository)


def release_metadata(**extra: object) -> dict[str, object]:
    """Common provenance written beside every model version."""
    return {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
