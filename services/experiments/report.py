"""Per-arm CTR, lift over control, 95% CI of the difference and a two-sided p-value.

Outcome: each *exposure* (one recommendation response) is a Bernoulli trial, a success when
at least one of its items gets a click from the same user in the same experiment. A click that
carries a ``recommendation_id`` is credited to the exposure with that ``request_id`` (when it
showed the item); any other click to that user's most recent exposure at or before it, within
``window_s``, containing the item. ``--unit user`` instead counts a user as a success when any of
their exposures was clicked - closer to the randomisation unit, since one user's exposures are
not independent trials (the per-exposure test is then somewhat optimistic).

Statistics (treatment ``t`` vs control ``c``, ``p = clicks / trials``):

* lift = ``(p_t - p_c) / p_c``;
* 95% CI of ``p_t - p_c``: Wald (unpooled normal approximation),
  ``(p_t - p_c) +/- 1.96 * sqrt(p_t (1-p_t)/n_t + p_c (1-p_c)/n_c)``; adequate when every
  arm has at least ~10 successes and ~10 failures (the report flags smaller counts);
* p-value: two-proportion z-test with the pooled rate ``p = (x_t + x_c) / (n_t + n_c)``,
  ``z = (p_t - p_c) / sqrt(p (1-p) (1/n_t + 1/n_c))``, ``p = 2 (1 - Phi(|z|))`` (equal to
  the chi-square test without continuity correction). Several treatment arms are each
  compared with control, without multiple-comparison correction.

By surface: exposures record the request's ``surface`` (``RequestContext.surface``); when any
does, the report adds a table per experiment, surface and arm (``summarise(by_surface=True)``;
exposures without one under ``-``), each arm compared with the control on the same surface.
A surface's arms are a slice of the randomised population, so read its p-values as
exploratory (one test per surface, no correction).

Usage: ``python -m services.experiments.report`` reads the JetStream exposures stream (the
gateways' records; ``RECSYS_NATS_URLS``), ``--log FILE`` a JSONL file instead (``make
ab-replay``'s, or a gateway's with ``RECSYS_EXPOSURE_SINK=file``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from services.experiments.exposures import read_log, read_stream

DEFAULT_WINDOW_S = 24 * 3600.0
NO_SURFACE = "-"  # the surface of an exposure recorded without one
Key = tuple[str, str, str]  # experiment, surface ("" unless by surface), arm


@dataclass(frozen=True)
class Comparison:
    """Treatment vs control on a binary outcome."""

    diff: float
    lift: float | None
    ci_low: float
    ci_high: float
    z: float
    p_value: float


def two_proportion_test(
    x_c: int, n_c: int, x_t: int, n_t: int, *, confidence: float = 0.95
) -> Comparison:
    """Wald CI of ``p_t - p_c`` and pooled two-sided z-test p-value (module docstring)."""
    if n_c <= 0 or n_t <= 0:
        raise ValueError("both arms need at least one trial")
    p_c, p_t = x_c / n_c, x_t / n_t
    diff = p_t - p_c
    zcrit = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    se = math.sqrt(p_c * (1 - p_c) / n_c + p_t * (1 - p_t) / n_t)
    pooled = (x_c + x_t) / (n_c + n_t)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    if se0 == 0.0:
        z, p = 0.0, 1.0
    else:
        z = diff / se0
        p = math.erfc(abs(z) / math.sqrt(2.0))
    return Comparison(
        diff=diff,
        lift=diff / p_c if p_c > 0 else None,
        ci_low=diff - zcrit * se,
        ci_high=diff + zcrit * se,
        z=z,
        p_value=p,
    )


@dataclass
class ArmResult:
    experiment: str
    arm: str
    trials: int
    successes: int
    clicks: int
    ctr: float
    is_control: bool
    comparison: Comparison | None = None
    small_sample: bool = False
    surface: str | None = None  # None: all surfaces together


def summarise(
    records: Iterable[dict[str, Any]],
    *,
    unit: str = "exposure",
    window_s: float | None = DEFAULT_WINDOW_S,
    controls: dict[str, str] | None = None,
    by_surface: bool = False,
) -> dict[str, Any]:
    """``{"arms": [ArmResult...], "unattributed_clicks": n, "arm_mismatches": n}``.

    ``controls`` maps experiment -> control arm (default: the arm named ``control``, else
    the alphabetically first arm). ``by_surface``: one result per experiment, surface and
    arm (clicks are attributed as without it, then counted on their exposure's surface).
    """
    if unit not in ("exposure", "user"):
        raise ValueError("unit must be 'exposure' or 'user'")
    exposures: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    by_request: dict[tuple[str, str], dict[str, Any]] = {}
    clicks: list[dict[str, Any]] = []
    for r in records:
        if not r.get("experiment"):
            continue  # a response logged outside every experiment (exposure_logging=all)
        if r["type"] == "exposure":
            exposures[(r["experiment"], r["user_id"])].append(r)
            if r.get("request_id"):
                by_request[(r["experiment"], r["request_id"])] = r
        elif r.get("event", "click") == "click":
            clicks.append(r)
    for lst in exposures.values():
        lst.sort(key=lambda e: e["ts"])
    clicked: set[int] = set()
    click_count: dict[int, int] = defaultdict(int)
    unattributed = mismatched = by_id = 0
    for c in clicks:
        match = by_request.get((c["experiment"], c.get("recommendation_id") or ""))
        if match is not None and (
            match["user_id"] != c["user_id"] or c["item_id"] not in match["items"]
        ):
            match = None  # not what that recommendation showed this user: by time instead
        by_id += match is not None
        for e in [] if match else reversed(exposures.get((c["experiment"], c["user_id"]), [])):
            if e["ts"] > c["ts"]:
                continue
            if window_s is not None and c["ts"] - e["ts"] > window_s:
                break
            if c["item_id"] in e["items"]:
                match = e
                break
        if match is None:
            unattributed += 1
            continue
        if c.get("arm") not in (None, match["arm"]):
            mismatched += 1
        clicked.add(id(match))
        click_count[id(match)] += 1

    trials: dict[Key, int] = defaultdict(int)
    wins: dict[Key, int] = defaultdict(int)
    nclicks: dict[Key, int] = defaultdict(int)
    for (exp, _user), lst in exposures.items():
        by_arm: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for e in lst:
            surface = (e.get("surface") or NO_SURFACE) if by_surface else ""
            by_arm[(surface, e["arm"])].append(e)
        for (surface, arm), es in by_arm.items():
            key = (exp, surface, arm)
            hit = [id(e) in clicked for e in es]
            nclicks[key] += sum(click_count[id(e)] for e in es)
            if unit == "exposure":
                trials[key] += len(es)
                wins[key] += sum(hit)
            else:
                trials[key] += 1
                wins[key] += int(any(hit))

    results: list[ArmResult] = []
    for exp in sorted({exp for exp, _, _ in trials}):
        all_arms = sorted({a for e, _, a in trials if e == exp})
        control = (controls or {}).get(exp) or ("control" if "control" in all_arms else all_arms[0])
        for surface in sorted({s for e, s, _ in trials if e == exp}):
            arms = sorted(a for e, s, a in trials if (e, s) == (exp, surface))
            xc, nc = wins.get((exp, surface, control), 0), trials.get((exp, surface, control), 0)
            for arm in [control, *[a for a in arms if a != control]]:
                n, x = trials.get((exp, surface, arm), 0), wins.get((exp, surface, arm), 0)
                res = ArmResult(
                    experiment=exp,
                    arm=arm,
                    trials=n,
                    successes=x,
                    clicks=nclicks.get((exp, surface, arm), 0),
                    ctr=x / n if n else 0.0,
                    is_control=arm == control,
                    small_sample=min(x, n - x) < 10,
                    surface=surface if by_surface else None,
                )
                if arm != control and nc > 0 and n > 0:
                    res.comparison = two_proportion_test(xc, nc, x, n)
                results.append(res)
    return {
        "unit": unit,
        "window_s": window_s,
        "arms": results,
        "unattributed_clicks": unattributed,
        "arm_mismatches": mismatched,
        "joined_by_recommendation_id": by_id,
    }


def _pct(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{100 * v:+.{digits}f}%"


def _pp(v: float) -> str:
    return f"{100 * v:+.2f} pp"


def format_table(summary: dict[str, Any]) -> str:
    """A markdown table of :func:`summarise` output."""
    unit = summary["unit"]
    surfaces = any(r.surface is not None for r in summary["arms"])
    lines = [
        f"| experiment |{' surface |' if surfaces else ''} arm | {unit}s | clicked | clicks "
        "| CTR | lift vs control | 95% CI of CTR difference (Wald) | p-value |",
        f"|---|{'---|' if surfaces else ''}---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in summary["arms"]:
        c = r.comparison
        arm = f"{r.arm} (control)" if r.is_control and r.arm != "control" else r.arm
        arm += " *" if r.small_sample else ""
        where = f" {r.surface} |" if surfaces else ""
        lines.append(
            f"| {r.experiment} |{where} {arm} | {r.trials} | {r.successes} | {r.clicks} "
            f"| {100 * r.ctr:.2f}% | {_pct(c.lift) if c else '-'} "
            f"| {f'[{_pp(c.ci_low)}, {_pp(c.ci_high)}]' if c else '-'} "
            f"| {f'{c.p_value:.4f}' if c else '-'} |"
        )
    window = summary["window_s"]
    notes = [
        f"Unit: {unit}; click window: "
        f"{'unlimited' if window is None else f'{window:.0f} s'}; "
        f"unattributed clicks: {summary['unattributed_clicks']}; "
        f"clicks joined by recommendation id: {summary.get('joined_by_recommendation_id', 0)}; "
        f"clicks whose logged arm differs from the exposure's: {summary['arm_mismatches']}."
    ]
    if any(r.small_sample for r in summary["arms"]):
        notes.append("* fewer than 10 successes or failures: the normal approximation is poor.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def to_json(summary: dict[str, Any]) -> dict[str, Any]:
    out = dict(summary)
    out["arms"] = [asdict(r) for r in summary["arms"]]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m services.experiments.report", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--log", type=Path, help="a JSONL file (default: the exposures stream)")
    ap.add_argument("--unit", choices=("exposure", "user"), default="exposure")
    ap.add_argument(
        "--window-s", type=float, default=DEFAULT_WINDOW_S, help="click window (<=0: unlimited)"
    )
    ap.add_argument("--json", type=Path, help="also write the summary as JSON here")
    args = ap.parse_args(argv)
    if args.log is not None and not args.log.exists():
        print(f"no such log: {args.log}", file=sys.stderr)
        return 2
    if args.log is not None:
        source, records = str(args.log), list(read_log(args.log))
    else:
        from core.config import get_settings
        from services.events.log import EventLogUnavailable

        settings = get_settings()
        source = f"stream {settings.exposures_stream} at {settings.nats_urls}"
        try:
            records = read_stream(settings)
        except EventLogUnavailable as exc:
            print(f"{source}: {exc}", file=sys.stderr)
            return 2
    window = args.window_s if args.window_s > 0 else None
    summary = summarise(records, unit=args.unit, window_s=window)
    if not summary["arms"]:
        print(f"{source}: no exposures recorded")
        return 0
    print(format_table(summary))
    out = to_json(summary)
    if any(r["type"] == "exposure" and r.get("surface") for r in records):
        per_surface = summarise(records, unit=args.unit, window_s=window, by_surface=True)
        print("\nBy surface (exploratory: one test per surface, no correction):\n")
        print(format_table(per_surface))
        out["by_surface"] = to_json(per_surface)["arms"]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
