"""``python -m services.gateway``: run the gateway with settings from the environment."""

from __future__ import annotations

import logging

from core.config import get_settings
from services.gateway.server import serve


def main() -> None:
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(settings)


if __name__ == "__main__":
    main()
