"""What the gateway holds between calls, and the monitor that keeps its health honest.

The monitor polls Triton, Milvus and the event log (NATS JetStream); the gRPC health service
reports SERVING only while all three are ready, and says plainly in the log which one is not.
It also creates missing Milvus collections, refreshes the popularity cache and the served
model version.
"""

from __future__ import annotations

import logging
import threading
import time

from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from core.config import Settings
from core.releases import pinned_model_name
from services.api import pb
from services.api import validation as v
from services.deadline import Deadline
from services.events import aggregates
from services.events.log import UNAPPLIED, BlockingEventLog, EventLogUnavailable
from services.experiments.runtime import ExperimentService
from services.gateway.metrics import observe_stage
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.profiles.profiles import Profiles
from services.recommend.pipeline import Pipeline
from services.recommend.rank import Rankers, release_rankers
from services.recommend.retrieve import PopularItems
from services.recommend.rules import RulesFile
from services.vectors.store import (
    Row,
    StoreSchemaError,
    StoreUnavailable,
    VectorStore,
    row_version,
)

log = logging.getLogger(__name__)
SERVICE_NAME = "recsys.v1.RecommenderService"
LOG_READ_S = 0.2  # a profile's reads of the event log (~1 ms each); slower: Milvus alone


class GatewayState:
    """Clients of the dependencies plus cached, periodically refreshed facts."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Business rules per surface, read before any connection is made: a bad file fails
        # the start (RulesConfigError); a bad change later keeps the last good rules.
        self.rules = RulesFile(settings.rules_file)
        self.store = VectorStore(settings)
        self.triton = TritonClient(settings)
        self.profiles = Profiles(self.store, self.triton, settings.history_window)
        self.popular = PopularItems(settings.popular_cache_size)
        # Ingested events go to the shared event log (NATS JetStream); profile workers,
        # separate processes, apply them. The gateway itself keeps no state of its own.
        self.events = BlockingEventLog(settings)
        self.events_ready = False
        # Invalid experiment JSON fails the start, loudly, rather than running no experiment.
        self.experiments = ExperimentService.from_settings(settings, self.events)  # one NATS
        # release -> what it deploys besides the towers, for every release Triton serves
        self.releases: dict[str, Rankers] = {}
        self.pipeline = Pipeline(
            settings,
            self.store,
            self.triton,
            self.popular,
            self.rankers,
            on_stage=observe_stage,
            read_profile=self.profile,
            served=lambda: self.model_version,
        )
        self.health = health.HealthServicer()
        self.model_version = ""
        self.triton_ready = False
        self.milvus_ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._popular_at = 0.0
        self._online_at = 0.0  # 0: the aggregates were not read yet
        self._set_health(False)
        # Liveness is about this process only: a Triton or Milvus outage must not make
        # Kubernetes restart every gateway, so probes ask for this service name.
        self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)

    def profile(self, user_id: str, deadline: Deadline, with_vector: bool) -> Row | None:
        """The user's profile as of every acknowledged event (None: no profile, or deleted).

        The Milvus row (from the profile cache when it holds one) with the events the
        profile workers have not applied to it yet folded in (:meth:`Profiles.merged`): a
        ``Recommend`` or ``GetUserProfile`` right after ``IngestEvents`` sees those events,
        through any replica, however far behind the workers are, and a cached or lagging
        read (a Milvus server below Strong) is made current by the log rather than by a
        Strong re-read. A row older than the user's tombstone was deleted since. When the
        log does not answer in time, the row as Milvus has it now (the workers' version): read
        again only when the first read came from the cache."""
        from_cache = self.store.user_in_cache(user_id, with_vector)
        row = self.store.get_user(user_id, deadline.left(), with_vector, cached=True)
        try:
            tombstone, applied, pending = self._unapplied(user_id, row, deadline)
            gone = row is None or tombstone > row_version(row)
            if applied > row_version(row) and (gone or len(pending) >= UNAPPLIED):
                # Milvus has a newer row than this (cached) one, and the workers made what
                # folding in cannot: a new (or returning) user's row with its segment, or a
                # history past what one read folds in. Read that row.
                self.store.user_cache.invalidate([user_id])
                row = self.store.get_user(user_id, deadline.left(), with_vector, cached=True)
                from_cache = False
                tombstone, _, pending = self._unapplied(user_id, row, deadline)
        except EventLogUnavailable as exc:
            log.debug("pending events of a user not read: %s", exc)
            if not from_cache:
                return row
            return self.store.get_user(user_id, deadline.left(), with_vector)
        if row is not None and tombstone > row_version(row):
            row = None  # deleted after it was written
        events = [(seq, e) for seq, data in pending if (e := _valid(data, user_id)) is not None]
        if not events:
            return row
        return self.profiles.merged(row, events, deadline, with_vector)

    def _unapplied(
        self, user_id: str, row: Row | None, deadline: Deadline
    ) -> tuple[int, int, list[tuple[int, bytes]]]:
        return self.events.call(
            lambda events: events.unapplied(user_id, row_version(row)),
            min(deadline.left(), LOG_READ_S),
        )

    def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def check_once(self) -> bool:
        """Probe the dependencies once and update health; True when all are ready."""
        events_ready = self.events.ready()
        if events_ready != self.events_ready:
            log.log(
                logging.INFO if events_ready else logging.WARNING,
                "event log %s (%s)",
                "ready" if events_ready else "NOT READY",
                self.settings.nats_urls,
            )
        self.events_ready = events_ready
        triton_ready = self.triton.ready()
        milvus_ready = self.store.ping()
        if not milvus_ready:
            try:
                self.store.ensure_collections()
                milvus_ready = self.store.ping()
            except StoreSchemaError as exc:
                log.error("milvus not usable: %s", exc)
            except StoreUnavailable as exc:
                log.info("milvus not ready: %s", exc)
        if triton_ready:
            try:
                self._refresh_releases()
            except InferenceUnavailable:
                triton_ready = False
        if not triton_ready:
            self.releases = {v: r.unready() for v, r in self.releases.items()}
        if (
            milvus_ready
            and (
                not len(self.popular)
                or time.monotonic() - self._popular_at > self._popular_period()
            )
            and self.popular.refresh(self.store)
        ):
            self._popular_at = time.monotonic()
        if events_ready and (self._online_due() or not self._online_at):
            self._refresh_online()
        if (triton_ready, milvus_ready) != (self.triton_ready, self.milvus_ready):
            log.log(
                logging.INFO if triton_ready and milvus_ready else logging.WARNING,
                "dependencies: triton %s (%s), milvus %s (%s)",
                "ready" if triton_ready else "NOT READY",
                self.settings.triton_url,
                "ready" if milvus_ready else "NOT READY",
                self.settings.milvus_uri,
            )
        self.triton_ready, self.milvus_ready = triton_ready, milvus_ready
        self._set_health(triton_ready and milvus_ready and events_ready)
        return triton_ready and milvus_ready and events_ready

    def rankers(self, release: str) -> Rankers:
        """What ``release`` deploys besides the towers ("": the served release)."""
        return self.releases.get(release or self.model_version, Rankers())

    def _refresh_releases(self) -> None:
        """The served release (the pinned one, else the newest ready user tower) and what
        each release Triton has deploys, from one read of its repository index."""
        index = self.triton.repository_index()
        user = self.settings.triton_user_model
        self.model_version = self.triton.model_version(user, index=index)
        # a release's own user-tower ensemble is loaded while it is (the shared one: newest)
        releases = {v for name, v in index if v and name == pinned_model_name(user, v)}
        releases |= {self.model_version} - {""}
        self.releases = {
            v: release_rankers(self.triton, index, v, self.releases.get(v)) for v in releases
        }

    def _popular_period(self) -> float:
        """The popularity refresh's period: its scan also fills the item cache
        (:meth:`VectorStore.all_items`), so it comes before the rows' TTL ends, a poll and a
        scan early, and no item is then read on demand."""
        s = self.settings
        early = s.milvus_item_cache_ttl_s - 2 * s.readiness_poll_s
        return max(min(s.popular_refresh_s, early), s.readiness_poll_s)

    def _online_due(self) -> bool:
        """Whether the online aggregates are read again now (never with a refresh of 0)."""
        refresh = self.settings.aggregates_refresh_s
        return bool(refresh) and time.monotonic() - self._online_at > refresh

    def _refresh_online(self) -> None:
        """The online popularity and co-occurrence the profile workers refresh from the
        event stream (:mod:`services.events.aggregates`), into the popularity cache, with the
        exploration share the indexing job recorded. With ``aggregates_refresh_s`` 0, read
        once, at start, for the share alone."""
        self._online_at = time.monotonic()
        try:
            online = self.events.call(lambda log: aggregates.read(log), 2.0)
        except Exception as exc:  # the previous aggregates stay in use
            log.warning("online aggregates not refreshed: %s", exc)
            if not self.settings.aggregates_refresh_s:
                self._online_at = 0.0  # the one read at start: retried at the next poll
            return
        self.popular.set_exploration_share(online.exploration_share)
        if self.settings.aggregates_refresh_s:
            self.popular.set_online(online.popularity, online.co_occurrence, online.indexed_weight)

    def start_background(self) -> None:
        """The dependency monitor (profiles are applied by the profile workers)."""
        self.start_monitor()

    def start_monitor(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.settings.readiness_poll_s):
                try:
                    self.check_once()
                except Exception:  # the monitor must outlive any single failure
                    log.exception("health check failed")

        self._thread = threading.Thread(target=loop, name="dependency-monitor", daemon=True)
        self._thread.start()

    def begin_shutdown(self) -> None:
        """Stop monitoring and report NOT_SERVING; in-flight calls still have the clients."""
        self._stop.set()
        self._set_health(False)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def close(self) -> None:
        self.begin_shutdown()
        if not self.experiments.flush():  # exposures in flight, before their connection goes
            log.warning("exposure records still unacknowledged at shutdown")
        self.events.close()
        self.triton.close()
        self.store.close()


def _valid(data: bytes, user_id: str) -> pb.Event | None:
    """The stored event, or None where a profile worker dead-letters it (it is no part of
    the profile the workers will write)."""
    try:
        return v.stored_event(data, user_id)
    except (DecodeError, v.InvalidArgument):
        return None
