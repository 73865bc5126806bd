"""``python -m services.profile_worker``: run a profile worker (settings from ``RECSYS_*``).

``python -m services.profile_worker dead-letters list`` lists dead letters with their
reasons; ``... dead-letters replay [SEQ ...]`` publishes them again after a fix.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from prometheus_client import start_http_server

from core.config import get_settings
from services.gc_pauses import freeze_long_lived
from services.profile_worker import dead_letters
from services.profile_worker.worker import ProfileWorker
from services.reliability import pseudonym


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    pseudonym.install(settings)
    if args[:1] == ["dead-letters"]:
        return dead_letters.main(settings, args[1:])
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.grpc_host)

    async def run() -> None:
        worker = ProfileWorker(settings)
        freeze_long_lived()  # modules and clients: full collections stay short
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop.set)
        await worker.run()
        logging.getLogger(__name__).info("profile worker stopped")

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
