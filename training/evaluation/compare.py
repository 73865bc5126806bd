"""``python -m training.evaluation.compare``: two evaluation runs, paired per user.

Two releases served one after the other (``make eval`` with one checkpoint, then another)
score the same split, fold-in and users, so their difference is best read user by user: a
mean over ~100 users moves by more than most differences between releases, while the
paired difference's bootstrap interval says whether the change shows. Each ``eval.json``
holds every system's per-user NDCG@10 per slice (``per_user_ndcg@10``); this reads two of
them and writes one row per slice::

    python -m training.evaluation.compare reports/eval/eval.json var/other/eval.json \\
        [--system pipeline_served] [--other-system pipeline_served] [--out compare.md]

The runs must share the split (data, cut-off, fold-in, seed): otherwise the users' targets
differ and a pairing would mean nothing, so that is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.evaluation import metrics as M

PER_USER = "per_user_ndcg@10"
SAME_SPLIT = ("kind", "quantile", "cutoff", "fold_in", "max_users", "seed")


class CompareError(ValueError):
    """The two runs cannot be paired (say why, with what to do)."""


@dataclass(frozen=True)
class SliceDifference:
    """One slice: each run's mean NDCG@10 over the common users, and ``other - base``."""

    slice: str
    users: int
    base: float
    other: float
    diff: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "within noise"


def per_user(run: Mapping[str, Any], system: str, label: str) -> dict[str, dict[str, float]]:
    """``slice -> user -> NDCG@10`` of ``system`` in one ``eval.json``."""
    table = run.get(PER_USER)
    if table is None:
        raise CompareError(
            f"{label} has no {PER_USER!r}: it was written before per-user scores were kept; "
            "re-run the evaluation"
        )
    out = {s: systems[system] for s, systems in table.items() if system in systems}
    if not out:
        known = sorted({name for systems in table.values() for name in systems})
        raise CompareError(f"{label} has no system {system!r}; it has {', '.join(known)}")
    return out


def check_same_split(base: Mapping[str, Any], other: Mapping[str, Any]) -> None:
    """Refuse runs whose splits differ: their users' targets would not be the same."""
    if base.get("dataset", {}).get("path") != other.get("dataset", {}).get("path"):
        raise CompareError(
            f"different datasets: {base.get('dataset', {}).get('path')} and "
            f"{other.get('dataset', {}).get('path')}"
        )
    a, b = base.get("split", {}), other.get("split", {})
    differ = [k for k in SAME_SPLIT if a.get(k) != b.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in differ)
        raise CompareError(f"different splits ({shown})")


def compare(
    base: Mapping[str, Any],
    other: Mapping[str, Any],
    system: str = "pipeline_served",
    other_system: str | None = None,
    *,
    samples: int = 2000,
    seed: int = 0,
) -> list[SliceDifference]:
    """Per slice, ``other_system`` of ``other`` against ``system`` of ``base`` on their
    common users (:func:`training.evaluation.metrics.paired_bootstrap`)."""
    check_same_split(base, other)
    a = per_user(base, system, "the base run")
    b = per_user(other, other_system or system, "the other run")
    rows = []
    for name in [s for s in a if s in b]:
        users = sorted(set(a[name]) & set(b[name]))
        if not users:
            continue
        boot = M.paired_bootstrap(b[name], a[name], samples=samples, seed=seed)
        rows.append(
            SliceDifference(
                slice=name,
                users=len(users),
                base=sum(a[name][u] for u in users) / len(users),
                other=sum(b[name][u] for u in users) / len(users),
                diff=boot["diff"],
                low=boot["low"],
                high=boot["high"],
            )
        )
    return rows


def markdown(rows: Sequence[SliceDifference], base: str, other: str) -> str:
    lines = [
        f"NDCG@10 per slice, paired on common users: {other} minus {base} "
        "(95% bootstrap interval over users)",
        "",
        f"| slice | users | {base} | {other} | difference | 95% CI | |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    lines += [
        f"| {r.slice} | {r.users} | {r.base:.4f} | {r.other:.4f} | {r.diff:+.4f} | "
        f"[{r.low:+.4f}, {r.high:+.4f}] | {r.verdict} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.compare", description=__doc__)
    ap.add_argument("base", type=Path, help="eval.json of the reference run")
    ap.add_argument("other", type=Path, help="eval.json of the run compared with it")
    ap.add_argument("--system", default="pipeline_served", help="system of the base run")
    ap.add_argument("--other-system", help="system of the other run (default: --system)")
    ap.add_argument("--base-label", help="column name (default: the base file's folder)")
    ap.add_argument("--other-label", help="column name (default: the other file's folder)")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args(argv)
    try:
        base, other = (json.loads(p.read_text()) for p in (args.base, args.other))
        rows = compare(base, other, args.system, args.other_system)
    except (OSError, json.JSONDecodeError, CompareError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    text = markdown(
        rows,
        args.base_label or args.base.parent.name,
        args.other_label or args.other.parent.name,
    )
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
