"""A value read from a file at start and read again when the file changes, without a restart.

API keys and business rules are files that Kubernetes updates in place: a Secret or
ConfigMap volume swaps a symlink, which changes the file's stamp (modification time, size,
inode). A bad file at start is an error (the process does not start with it); afterwards the
stamp is looked at no more than every ``check_s`` seconds, on the request path, and a new
version that cannot be used keeps the last good value in force, with an error in the log.
(TLS material has its own fetcher in :mod:`services.reliability.tls`: gRPC asks for it per
connection and a certificate must not be read half-written.)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

RELOAD_CHECK_S = 1.0
Stamp = tuple[int, int, int]


def file_stamp(path: Path | None) -> Stamp | None:
    """``(mtime_ns, size, inode)`` of ``path`` (following symlinks), None if it is absent."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class WatchedFile(Generic[T]):
    """``load()``'s value, loaded again when ``path`` changes.

    ``load`` raises one of ``errors`` for a file it cannot use; ``refuse`` may name a reason
    to keep the old value although the new one loaded (for instance an empty key file).
    """

    def __init__(
        self,
        path: Path | None,
        load: Callable[[], T],
        what: str,
        errors: tuple[type[Exception], ...] = (OSError, ValueError),
        refuse: Callable[[T], str | None] = lambda value: None,
        check_s: float = RELOAD_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.what = what
        self.check_s = check_s
        self.clock = clock
        self.reloads = 0
        self.failed_reloads = 0
        self._load = load
        self._errors = errors
        self._refuse = refuse
        self._lock = threading.Lock()
        self._stamp = file_stamp(path)
        self._value = load()  # a bad file at start raises
        self._next_check = clock() + check_s

    def current(self) -> T:
        """The value in force, loaded again first when the file changed since the last look."""
        now = self.clock()
        if self.path is None or now < self._next_check:
            return self._value
        with self._lock:
            if now < self._next_check:
                return self._value
            self._next_check = now + self.check_s
            stamp = file_stamp(self.path)
            if stamp is None or stamp == self._stamp:
                return self._value  # unchanged, or missing mid-swap: keep what works
            self._stamp = stamp
            try:
                value = self._load()
                reason = self._refuse(value)
            except self._errors as exc:
                reason = str(exc)
            if reason is not None:
                self.failed_reloads += 1
                log.error(
                    "%s changed but is not usable, keeping the last one: %s", self.what, reason
                )
                return self._value
            self._value = value
            self.reloads += 1
        log.info("%s reloaded from %s", self.what, self.path)
        return value
