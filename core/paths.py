"""Where the repository is, with no dependencies: the GPU benchmark machine imports this
without the serving stack (pydantic-settings) installed."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
