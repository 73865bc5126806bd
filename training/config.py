"""Training configuration: dataclasses mirroring ``training/configs/*.yaml``.

Kept free of torch and Ray so that reading a config (``--help``, the k8s manifest checks)
stays cheap. ``load_config`` rejects unknown keys and casts values to the field types,
because a typo in a YAML key would otherwise silently train with the default.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.config import REPO_ROOT, get_settings
from training.pretrained import resolve_pretrained

#: where the sequence model's item content vectors come from (``SequenceConfig``)
CONTENT_SOURCES = ("item_tower", "pretrained")
#: the sequence model's default alternative setting: no id embeddings (every item through its
#: content vector and the new-item vector), 60 epochs early-stopped, lr 5e-3, d=64, light
#: regularisation; chosen on the music log's and the shop's validation windows (FINDINGS.md)
CONTENT_ONLY: dict[str, Any] = {
    "id_dropout": 1.0,
    "epochs": 60,
    "lr": 5e-3,
    "dim": 64,
    "dropout": 0.1,
    "weight_decay": 0.0,
    "early_stop_every": 5,
}


@dataclass
class StageConfig:
    """What every Ray Train stage reads (see :mod:`training.loop`)."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_seq_len: int = 64
    max_examples: int | None = 400
    eval_users: int | None = 100
    eval_batch_size: int = 64
    eval_before_training: bool = False
    log_every: int = 5
    #: stop after this many epochs of the ``epochs``-long schedule (the epoch where early
    #: stopping on a validation cut-off peaked, :mod:`training.sequence_choice`)
    stop_epoch: int | None = None
    #: test hook: raise once after this epoch to exercise FailureConfig + resume
    fail_after_epoch: int | None = None

    @property
    def run_epochs(self) -> int:
        """The epochs trained: ``epochs``, or fewer where ``stop_epoch`` cuts the schedule."""
        return self.epochs if self.stop_epoch is None else min(self.stop_epoch, self.epochs)


@dataclass
class RetrievalConfig(StageConfig):
    shared_weights: bool = True
    temperature: float = 0.05
    learn_temperature: bool = True
    k: int = 10
    #: relevant items per validation user: their next N unseen positives after the split
    eval_relevant_per_user: int | None = 10
    #: items ranked at validation: relevant items + a random sample up to this size
    #: (``null`` = the whole catalogue)
    eval_candidates: int | None = 1000
    #: the trained towers' encoding passes (the catalogue vectors, hard-negative mining) run
    #: their matrix products in bf16 on a CPU with bf16 instructions (``training.precision``:
    #: 2.1x there); false keeps fp32 everywhere. Training steps stay fp32
    bf16_encoding: bool = True


@dataclass
class RankerConfig(StageConfig):
    max_seq_len: int = 128
    max_examples: int | None = 200  # positives; each gets the negatives below
    random_negatives: int = 1
    hard_negatives: int = 1
    hard_negative_top_k: int = 50
    mining_candidates: int | None = 2000
    eval_users: int | None = 50
    eval_positives_per_user: int = 2
    eval_random_negatives: int = 2
    eval_hard_negatives: int = 2
    balance_classes: bool = False


@dataclass
class SequenceConfig(StageConfig):
    """The SASRec-style sequence model (:mod:`training.models.sequence`), trained by the Ray
    loop (``sequence:`` section) and in-process by the offline evaluation. ``max_seq_len`` is
    the number of most recent interactions the transformer reads. The defaults were chosen on
    a validation window inside the training period (``training/evaluation/FINDINGS.md``)."""

    enabled: bool = True
    epochs: int = 6
    batch_size: int = 32  # sequences (chunks of at most max_seq_len + 1 events) per step
    lr: float = 2e-3
    weight_decay: float = 0.1  # decoupled (AdamW); on the id embeddings too
    warmup_ratio: float = 0.05
    max_seq_len: int = 50
    max_examples: int | None = None  # training sequences (chunks); None = all of them
    eval_users: int | None = 500
    eval_batch_size: int = 256
    log_every: int = 20
    dim: int = 32
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.5
    #: share of catalogue items whose id embedding is replaced by the "new item" vector in a
    #: training step, so the content + new-item path alone learns to score (cold items)
    id_dropout: float = 0.1
    #: ``full``: softmax over the whole catalogue; ``sampled``: ``negatives`` items drawn by
    #: popularity, logits corrected by ``-log q`` (large catalogues)
    loss: str = "full"
    #: each target's loss weighs ``(the user's positive events) ** -user_balance``: 0 = every
    #: event alike (heavy users dominate), 1 = every user alike, as the per-user metrics
    user_balance: float = 0.0
    negatives: int = 1024
    #: add the learned request-time item term (decayed popularity at several half-lives and
    #: item age, from snapshots of the training period) to every score
    time_term: bool = True
    time_periods: int = 128  # snapshots of that term over the training period
    #: project the items' frozen BERT content vectors into the item representation
    use_content: bool = True
    #: ``item_tower``: the run's trained item tower, the vectors Milvus and the feature ranker
    #: get (one content encoder, the catalogue encoded once per run); ``pretrained``: the
    #: frozen ``content_model`` below (the evaluation's in-process model always reads that one)
    content_source: str = "item_tower"
    content_model: str = ""  # "" = the run's pretrained model
    content_max_seq_len: int = 128  # the same as the evaluation's content baseline: one cache
    content_cache: bool = True  # cache item vectors under var/cache/eval/
    #: a second setting (overrides of this one) tried against it on a validation cut-off
    #: inside the training period; the better one is trained (``make train``, ``make eval``:
    #: :mod:`training.sequence_choice`). ``{}``: no choice. The default reads items
    #: through their content alone, longer and lighter: thin catalogues (few users per item)
    #: overfit the ids and need more steps (FINDINGS.md, "The sequence model on thin
    #: catalogues")
    alternative: dict[str, Any] = field(default_factory=lambda: dict(CONTENT_ONLY))
    #: where the choice cuts the training period (event-count quantile), and the fewest users
    #: after it with a history before it that it chooses on: below, the configured setting
    #: is kept without a run (MovieLens's cut-off leaves 11, whose paired standard error,
    #: 0.031, was as large as the scores themselves)
    choice_quantile: float = 0.9
    choice_min_users: int = 50
    #: early stopping (a run with a validation set): evaluate every this many epochs (0: off)
    #: and stop after ``early_stop_patience`` evaluations without a better score
    early_stop_every: int = 0
    early_stop_patience: int = 2

    def __post_init__(self) -> None:
        if self.content_source not in CONTENT_SOURCES:
            raise ValueError(
                f"sequence.content_source must be one of {CONTENT_SOURCES}, "
                f"got {self.content_source!r}"
            )
        if self.alternative:
            self.alternative_config()  # unknown keys and bad values fail at load time

    def alternative_config(self) -> SequenceConfig:
        """This setting with :attr:`alternative`'s overrides (itself without a choice)."""
        base = {**dataclasses.asdict(self), "alternative": {}}
        return _build(SequenceConfig, {**base, **self.alternative}, "sequence.alternative")


@dataclass
class FeatureRankerConfig(StageConfig):
    """The DCN-v2 feature ranker (:mod:`training.models.feature_ranker`) on the gateway's
    candidates replayed at cut-offs inside the training period
    (:mod:`training.data.candidates`). ``batch_size`` counts users (each a few hundred
    candidates); ``eval_users`` are drawn after the training/validation split."""

    enabled: bool = True
    epochs: int = 8
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.05
    max_examples: int | None = None  # unused: ``users_per_cutoff`` bounds the data
    eval_users: int | None = 300
    log_every: int = 50
    cross_layers: int = 2
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    #: 0: the three catalogues' validation users rank the same with 0.1 (within one standard
    #: error on all six windows), and drawing the masks took half of a fit's time
    #: (training/evaluation/FINDINGS.md)
    dropout: float = 0.0
    #: DCN-v2s trained side by side from their own initialisations, the served logit their
    #: mean (:class:`~training.models.feature_ranker.RankerEnsemble`); 1: one DCN-v2. Three
    #: rank as well as one on the three catalogues' validation users, and their lists move
    #: less with the seed (training/evaluation/FINDINGS.md)
    members: int = 3
    #: cut-offs as event-count quantiles of the training period
    cutoffs: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    users_per_cutoff: int | None = 400
    #: keep equal to the gateway's RECSYS_RANK_CANDIDATES and RECSYS_HISTORY_WINDOW
    candidates: int = 100
    history_window: int = 50
    fold_in: int = 3
    targets: int = 10
    #: the sequence model as a candidate source and two features (its release then serves
    #: it, at one more Triton request per Recommend); off, the release serves no sequence
    #: model. On: ``choose_release`` decides per catalogue
    sequence: bool = True
    #: serve the ranker and the sequence model only where they earn their requests: the
    #: retrieval order and the ranker, each with and without the sequence model, compared on
    #: the users of the last ``choice_windows`` cut-offs; the cheapest within one standard
    #: error of the best is served (:mod:`training.release_choice`;
    #: training/evaluation/FINDINGS.md). Off: the ranker is served, with the sequence model
    #: when ``sequence``
    choose_release: bool = True
    choice_seeds: int = 2  # rankers trained per compared ranker release
    #: the release choice's validation cut-offs, the last ones that have a cut-off before
    #: them to train on: each window's rankers train on the cut-offs before it. Four of the
    #: seven default cut-offs: each window's rankers train on at least three
    choice_windows: int = 4
    #: replay the gateway's fusion of the sources into its ``candidates`` (with the serving
    #: settings' ``retrieval_weights``, RECSYS_RETRIEVAL_WEIGHTS), so that the ranker learns
    #: on the candidates it will be served; false: the union of every source's best
    #: ``candidates`` (some 250 a user), the replay before 2026-12-04
    fused: bool = True

    def __post_init__(self) -> None:
        if self.choice_windows < 1 or self.choice_seeds < 1 or self.members < 1:
            raise ValueError(
                "feature_ranker.choice_windows, choice_seeds and members must be at least 1, "
                f"got {self.choice_windows}, {self.choice_seeds} and {self.members}"
            )


@dataclass
class TrackingConfig:
    """MLflow tracking of ``python -m training.train`` (:mod:`training.tracking`): one parent
    run per invocation, a nested run per stage. A tracking failure only logs a warning."""

    enabled: bool = True
    #: "" = ``MLFLOW_TRACKING_URI`` when set, else a local file store ``<storage_path>/mlruns``
    #: (``<RECSYS_VAR_DIR>/mlruns`` when storage_path is a URI); a value here wins over both
    tracking_uri: str = ""
    experiment: str = ""  # "" = MLFLOW_EXPERIMENT_NAME, else "recsys-training"
    run_name: str = ""  # "" = <name>-<UTC start time>
    #: release files up to this size are logged as artifacts; larger ones (the BERT weights)
    #: are listed in the artifact release/SKIPPED.txt instead
    max_artifact_mb: float = 10.0
    #: MLflow HTTP timeout and retries (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES win): a
    #: tracking server that is down costs seconds once, then tracking is off for the run
    timeout_s: int = 10
    max_retries: int = 2


@dataclass
class TrainConfig:
    name: str = "local"
    data_dir: str = "third_party/movielens/ml-latest-small"
    pretrained_model: str = ""  # "" = core.config pretrained_model, else bundled MiniLM
    storage_path: str = "runs"
    output_dir: str | None = None  # default <storage_path>/<name>/final
    seed: int = 0
    # time split for validation: leave_last_n per user, else cutoff, else quantile
    split_quantile: float | None = 0.8
    split_cutoff: str | None = None
    split_leave_last_n: int | None = None
    history_len: int = 20
    max_chars: int = 1000
    # Ray
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray with num_cpus
    num_cpus: int | None = 2
    object_store_memory: int | None = None
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 1
    checkpoints_to_keep: int = 2
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    feature_ranker: FeatureRankerConfig = field(default_factory=FeatureRankerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        ret = _build(RetrievalConfig, d.pop("retrieval", None) or {}, "retrieval")
        rk = _build(RankerConfig, d.pop("ranker", None) or {}, "ranker")
        seq = _build(SequenceConfig, d.pop("sequence", None) or {}, "sequence")
        fr = _build(FeatureRankerConfig, d.pop("feature_ranker", None) or {}, "feature_ranker")
        trk = _build(TrackingConfig, d.pop("tracking", None) or {}, "tracking")
        cfg = _build(cls, d, "")
        cfg.retrieval, cfg.ranker, cfg.sequence, cfg.feature_ranker = ret, rk, seq, fr
        cfg.tracking = trk
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def storage(self) -> str:
        """Ray Train's ``storage_path``: a URI as given, a local path made absolute."""
        s = self.storage_path
        return s if "://" in s else str(resolve_path(s))

    def run_dir(self, stage: str) -> Path:
        """The Ray run directory of a stage; its name is the ``RunConfig`` name, which is
        what lets Ray restore an unfinished run."""
        return Path(self.storage()) / f"{self.name}-{stage}"

    def export_dir(self) -> Path:
        """Where the final models and ``metrics.json`` go (always a local directory)."""
        default = Path(self.storage()) / self.name / "final"
        out = Path(self.output_dir) if self.output_dir else default
        if "://" in str(out):
            raise ValueError("output_dir must be a local path")
        return out.absolute()

    def pretrained_dir(self) -> str:
        """The BERT directory both stages start from: the config's, else the platform
        setting, else the bundled all-MiniLM-L6-v2."""
        name = self.pretrained_model
        if not name:
            try:
                name = get_settings().pretrained_model
            except Exception:  # invalid RECSYS_* settings: fall back to the bundled model
                name = ""
        return resolve_pretrained(name)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """YAML reads ``1e-3`` as a string and ``5`` as an int: cast to the field's type."""
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {key!r} must be a list, got {value!r}")
        (element,) = typing.get_args(hint)
        return [_coerce(v, element, f"{key}[{n}]") for n, v in enumerate(value)]
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if hint is not None and type(None) not in typing.get_args(hint):
            raise ValueError(f"config key {key!r} must not be null")
        return None
    target = args[0] if args else hint
    if target is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true/false, got {value!r}")
        return value
    if target in (int, float, str):
        try:
            out = target(value)
        except (TypeError, ValueError):
            msg = f"config key {key!r}: cannot read {value!r} as {target.__name__}"
            raise ValueError(msg) from None
        if target is int and isinstance(value, float) and value != out:
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return out
    return value


def _build(cls: Any, d: dict[str, Any], where: str) -> Any:
    """``cls(**d)`` with unknown keys rejected and every value coerced to its field type."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where or 'top level'}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()})


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (or defaults) plus ``key=value`` / ``section.key=value`` overrides (values
    parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    for ov in overrides or []:
        key, sep, value = ov.partition("=")
        if not sep:
            raise ValueError(f"override {ov!r} is not key=value")
        target = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = yaml.safe_load(value)
    return TrainConfig.from_dict(raw)


def resolve_path(p: str) -> Path:
    """A config path as given when it exists (or is absolute or a URI), else relative to the
    repository, so the configs work from any working directory."""
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists() or "://" in p:
        return path.absolute() if "://" not in p else path
    alt = REPO_ROOT / path
    return alt if alt.exists() else path.absolute()
