"""``python -m training.evaluation``: offline evaluation of every system on one split.

Example::

    python -m training.evaluation --data third_party/movielens/ml-latest-small \\
        [--checkpoint runs/local/final] [--max-users N] [--out reports/eval] [--smoke]

``python -m ops.served_eval`` takes the same arguments and adds the running
gateway as one more system.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: Sequence[str] | None = None, extra_systems: Sequence[Any] = ()) -> int:
    """Parse, evaluate every system (plus ``extra_systems``, e.g. the served gateway), report."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation", description=__doc__)
    ap.add_argument("--data", type=Path, required=True, help="MovieLens or generic dataset dir")
    ap.add_argument("--checkpoint", type=Path, help="training output with user_tower/, ...")
    ap.add_argument("--out", type=Path, default=Path("reports/eval"))
    ap.add_argument("--max-users", type=int, help="evaluate a seeded sample of test users")
    ap.add_argument("--quantile", type=float, default=0.8, help="global time cut-off quantile")
    ap.add_argument("--fold-in", type=int, default=3, help="post-cut-off events revealed/user")
    ap.add_argument("--cold-max-events", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pretrained-model", default="", help="HF BERT dir (default: MiniLM pkg)")
    ap.add_argument("--smoke", action="store_true", help="small fast run (a data subset)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("transformers", "httpx", "urllib3", "matplotlib", "implicit"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        print(f"note: checkpoint {args.checkpoint} not found; checkpoint systems skipped")
        args.checkpoint = None

    from training.evaluation.report import render_markdown, write_report
    from training.evaluation.runner import EvalOptions, run_evaluation

    opts = EvalOptions(
        data=args.data,
        out=args.out,
        checkpoint=args.checkpoint,
        quantile=args.quantile,
        fold_in=args.fold_in,
        cold_max_events=args.cold_max_events,
        max_users=args.max_users,
        seed=args.seed,
        threads=args.threads,
        smoke=args.smoke,
        pretrained_model=args.pretrained_model,
        bootstrap_samples=500 if args.smoke else 2000,
        val_quantiles=(0.8,) if args.smoke else (0.7, 0.8, 0.9),
        extra_systems=list(extra_systems),
    )
    result = run_evaluation(opts)
    paths = write_report(result, args.out, plots=not args.no_plots)
    print(render_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
