"""Writing an evaluation result: ``eval.md`` (tables), ``eval.json`` (everything), PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training.evaluation.reference import OFFLINE_REFERENCE

COLUMNS = (
    ("recall@10", "Recall@10"),
    ("recall@20", "Recall@20"),
    ("ndcg@10", "NDCG@10"),
    ("mrr@20", "MRR@20"),
    ("hit_rate@10", "HitRate@10"),
    ("coverage@10", "Coverage@10"),
    ("ild@10", "ILD@10"),
    ("novelty@10", "Novelty@10"),
)
SLICE_TITLES = {
    "all": "All test users (long horizon: every later positive)",
    "warm": "Warm users (long horizon)",
    "cold_start": "Cold-start users (long horizon)",
    "new_items": "New items (targets restricted to items without training events)",
    "next_items": "Next items: the next 10 positives after the fold-in point",
    "next_items_warm": "Next items, warm users",
    "next_items_cold": "Next items, cold-start users",
    "next_30_days": "Next 30 days: positives within 30 days of the fold-in point",
}
ACCURACY = ("recall@10", "recall@20", "ndcg@10", "mrr@20", "hit_rate@10")
#: issue #15's quality targets, judged here from the numbers an ``eval.json`` keeps (so a
#: report re-rendered from an older run is judged by the same rules)
NEXT_ITEMS_RATIO = 1.2  # next items: >= 1.2x the best baseline, the paired CI above 0
COLD_START_RATIO = 1.3  # cold-start users: >= 1.3x popularity, the paired CI above 0
NEW_ITEMS_NDCG = 0.02  # new items: NDCG@10 above this


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4f}"


def metrics_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of one slice; the best value of each accuracy column in bold."""
    head = "| system | users | " + " | ".join(t for _, t in COLUMNS) + " |"
    sep = "|---|---:|" + "---:|" * len(COLUMNS)
    best = {
        key: max((r.get(key, float("-inf")) for r in rows.values()), default=0.0)
        for key, _ in COLUMNS
    }
    lines = [head, sep]
    for name, r in rows.items():
        cells = []
        for key, _ in COLUMNS:
            v = r.get(key)
            s = _fmt(v)
            if key in ACCURACY and v is not None and v == best[key] and v > 0:
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {name} | {int(r.get('users', 0))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def losses(result: dict[str, Any], system: str = OFFLINE_REFERENCE) -> list[str]:
    """Every (slice, accuracy metric) where another system beats ``system``."""
    out = []
    for sname, rows in result["metrics"].items():
        if system not in rows:
            continue
        for key, title in COLUMNS:
            if key not in ACCURACY:
                continue
            mine = rows[system].get(key, 0.0)
            better = sorted(
                ((n, r[key]) for n, r in rows.items() if n != system and r.get(key, 0) > mine),
                key=lambda x: -x[1],
            )
            if better:
                who = ", ".join(f"{n} {v:.4f}" for n, v in better)
                out.append(f"{sname} / {title}: pipeline {mine:.4f} < {who}")
    return out


def _verdict(met: bool) -> str:
    return "**met**" if met else "**NOT met**"


def quality_target_lines(qt: dict[str, Any], metrics: dict[str, Any] | None = None) -> list[str]:
    """Issue #15's verdicts for one system (the offline reference or a served one), from its
    :func:`~training.evaluation.runner` target numbers and the run's metrics table."""
    lines: list[str] = []
    name = qt.get("system", OFFLINE_REFERENCE)
    if not qt.get("evaluated"):
        return [f"- not evaluated: {qt.get('reason', 'pipeline missing')}"]
    metrics = metrics or {}
    vb = qt["vs_best_baseline_all"]
    lines.append(
        f"- Long horizon, all users: `{name}` NDCG@10 {qt['pipeline_ndcg_all']:.4f} vs best "
        f"baseline `{qt['best_baseline_all']}` {qt['best_baseline_ndcg_all']:.4f} (paired "
        f"difference {vb['diff']:+.4f}, 95% bootstrap CI [{vb['low']:+.4f}, {vb['high']:+.4f}] "
        f"over {int(vb['users'])} users): {_verdict(vb['high'] >= 0)} (target: not below it, "
        "the interval not entirely below 0)."
    )
    reference = metrics.get("all", {}).get(OFFLINE_REFERENCE, {}).get("ndcg@10")
    if name != OFFLINE_REFERENCE and reference is not None:
        lines.append(
            f"- Long horizon against the offline reference `{OFFLINE_REFERENCE}` "
            f"{reference:.4f}: {_verdict(qt['pipeline_ndcg_all'] >= reference)} (target: at "
            "least equal)."
        )
    if "best_issue_baseline_all" in qt and qt["best_issue_baseline_all"] != qt["best_baseline_all"]:
        vi = qt["vs_best_issue_baseline_all"]
        lines.append(
            f"- Against the issue's list only (without the trending popularity added "
            f"here): best `{qt['best_issue_baseline_all']}` "
            f"{qt['best_issue_baseline_ndcg_all']:.4f}, difference {vi['diff']:+.4f} "
            f"[{vi['low']:+.4f}, {vi['high']:+.4f}]."
        )
    if "next_items" in qt:
        nx = qt["next_items"]
        vn = nx["vs_best_baseline"]
        met = nx["ratio"] >= NEXT_ITEMS_RATIO and vn["low"] > 0
        lines.append(
            f"- Next items: `{name}` NDCG@10 {nx['ndcg']:.4f} vs best baseline "
            f"`{nx['best_baseline']}` {nx['best_baseline_ndcg']:.4f} "
            f"({nx['ratio']:.2f}x, CI of difference [{vn['low']:+.4f}, {vn['high']:+.4f}]): "
            f"{_verdict(met)} (target >= {NEXT_ITEMS_RATIO}x, CI above 0)."
        )
    if "pipeline_ndcg_cold" in qt:
        vp = qt["vs_popularity_cold"]
        ratio = 1 + qt["relative_margin_cold"]
        lines.append(
            f"- Cold start: `{name}` {qt['pipeline_ndcg_cold']:.4f} vs popularity "
            f"{qt['popularity_ndcg_cold']:.4f} ({ratio:.2f}x, CI of difference "
            f"[{vp['low']:+.4f}, {vp['high']:+.4f}]): "
            f"{_verdict(ratio >= COLD_START_RATIO and vp['low'] > 0)} "
            f"(target >= {COLD_START_RATIO}x, CI above 0)."
        )
    new = metrics.get("new_items", {}).get(name, {})
    if new.get("users"):
        lines.append(
            f"- New items: `{name}` NDCG@10 {new['ndcg@10']:.4f} over {int(new['users'])} "
            f"users: {_verdict(new['ndcg@10'] > NEW_ITEMS_NDCG)} (target > {NEW_ITEMS_NDCG})."
        )
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    d, sp = result["dataset"], result["split"]
    lines = [
        "# Offline evaluation",
        "",
        f"- **Dataset**: `{d['path']}` - {d['events']} events, {d['items']} items, "
        f"{d['users']} users{' (smoke subset)' if d['smoke_subset'] else ''}.",
        f"- **Split**: {sp['kind']}, quantile {sp['quantile']} (first test event "
        f"{sp['first_test_event']}): {sp['train_events']} train / {sp['test_events']} test "
        f"events. Fold-in: each test user's first {sp['fold_in']} post-cut-off events are "
        "revealed as history (not training data); the rest are predicted.",
        f"- **Users**: {sp['test_users']} test users"
        + (f" (sampled, max {sp['max_users']})" if sp.get("max_users") else "")
        + "; per slice: "
        + ", ".join(f"{k} {v}" for k, v in sp["slice_users"].items())
        + f". Cold start = at most {sp['cold_max_events']} known events at recommendation "
        f"time; {sp['new_items']} catalogue items have no training event.",
        f"- **Seed**: {result['seed']}; threads {result['threads']}; "
        f"checkpoint: {result['checkpoint'] or 'none'}; {result['ranker']}.",
        f"- **Popularity half-life** (time-decayed popularity, chosen on the training "
        f"events): {result.get('popularity_half_life_days') or '-'} days.",
        *[f"- **Checkpoint note**: {n}." for n in result.get("checkpoint_notes", [])],
        f"- **Diversity (ILD)** measured in: {result['ild_space']}. Novelty: mean "
        "-log2 p(item) from training popularity (add-one smoothed).",
        "",
    ]
    for sname, rows in result["metrics"].items():
        lines += [f"## {SLICE_TITLES.get(sname, sname)}", "", metrics_table(rows), ""]
    lines += ["## Quality targets (issue #15)", ""]
    targets = [result.get("quality_target", {})]
    targets += list(result.get("quality_targets_extra", {}).values())
    for qt in targets:
        lines += quality_target_lines(qt, result.get("metrics"))
    lost = losses(result)
    lines += ["", "## Where the pipeline loses", ""]
    lines += [f"- {x}" for x in lost] or ["- nowhere on the accuracy metrics above."]
    pipe = result.get("pipeline") or {}
    if pipe.get("config"):
        cfg = pipe["config"]
        lines += [
            "",
            "## Pipeline configuration (chosen on a validation split of the training period)",
            "",
            f"- Validation: {pipe['validation_users']} users "
            f"({pipe['validation_cold_users']} cold) over {len(pipe['validation_folds'])} "
            "windows of the training period (cut-off quantiles "
            + ", ".join(str(f["quantile"]) for f in pipe["validation_folds"])
            + " of training events; same fold-in).",
            f"- Fusion weights (RRF, k={cfg['rrf_k']}): {cfg['weights']}",
            f"- Cold-start weights: {cfg['cold_weights'] or 'same as above'}",
            f"- Ranker weight: {cfg['ranker_weight']} (top {cfg['ranker_top']}); "
            f"MMR lambda: {cfg['mmr_lambda']} (largest within 1% of the best validation "
            "NDCG@10).",
            "- Validation MMR curve (lambda: NDCG@10): "
            + ", ".join(f"{k}: {v:.4f}" for k, v in pipe["mmr_curve"].items()),
            "- Weight search (coordinate ascent over the grid 0, 0.5, 1, 2, 4; validation "
            "NDCG@10 from the all-ones start to the chosen weights, per cohort): "
            + "; ".join(_trace_summary(pipe["trace"])),
        ]
        if pipe.get("mmr_tradeoff_test"):
            lines += [
                "",
                "MMR trade-off on the test users (reported only, not used to choose lambda):",
                "",
                "| lambda | NDCG@10 | ILD@10 |",
                "|---:|---:|---:|",
            ]
            lines += [
                f"| {r['lambda']} | {r['ndcg@10']:.4f} | {r['ild@10']:.4f} |"
                for r in pipe["mmr_tradeoff_test"]
            ]
    abl = pipe.get("ablations_test") or []
    if abl:
        lines += [
            "",
            "Ablations on the test users (one source's weight set to 0, no re-tuning, ranker "
            "stage off):",
            "",
            "| without | NDCG@10 all | NDCG@10 cold start |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {r['without']} | {r['ndcg@10_all']:.4f} | {r['ndcg@10_cold_start']:.4f} |"
            for r in abl
        ]
    if result["skipped"]:
        lines += ["", "## Skipped systems", ""]
        lines += [f"- `{n}`: {why}" for n, why in result["skipped"].items()]
    lines += [
        "",
        "## Runtime",
        "",
        "| system | fit + fold-in (s) | recommend (s) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {n} | {t['fit_s']:.1f} | {t['recommend_s']:.1f} |" for n, t in result["timings"].items()
    ]
    lines += ["", f"Total: {result['seconds']:.1f} s.", ""]
    return "\n".join(lines)


def _trace_summary(trace: list[dict[str, Any]]) -> list[str]:
    out = []
    for cohort in dict.fromkeys(t["cohort"] for t in trace):
        steps = [t for t in trace if t["cohort"] == cohort]
        out.append(f"{cohort} {steps[0]['ndcg@10']:.4f} -> {steps[-1]['ndcg@10']:.4f}")
    return out


def plot(result: dict[str, Any], out: Path) -> list[str]:
    """``ndcg_by_slice.png``, ``accuracy_vs_beyond.png`` and ``mmr_tradeoff.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    slices = list(result["metrics"])
    systems = list(result["metrics"]["all"])
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    width = 0.8 / max(1, len(systems))
    for n, name in enumerate(systems):
        vals = [result["metrics"][s].get(name, {}).get("ndcg@10", 0.0) for s in slices]
        ax.bar([i + n * width for i in range(len(slices))], vals, width, label=name)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(slices))])
    ax.set_xticklabels(slices)
    ax.set_ylabel("NDCG@10")
    ax.set_title("NDCG@10 by slice")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "ndcg_by_slice.png")
    plt.close(fig)
    written.append("ndcg_by_slice.png")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), dpi=100)
    rows = result["metrics"]["all"]
    for ax, key in zip(axes, ("coverage@10", "ild@10", "novelty@10"), strict=True):
        for name, r in rows.items():
            ax.scatter(r.get(key, 0.0), r["ndcg@10"])
            ax.annotate(name, (r.get(key, 0.0), r["ndcg@10"]), fontsize=7)
        ax.set_xlabel(key)
        ax.set_ylabel("NDCG@10")
    fig.suptitle("Accuracy vs coverage / diversity / novelty (all users)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_beyond.png")
    plt.close(fig)
    written.append("accuracy_vs_beyond.png")

    curve = (result.get("pipeline") or {}).get("mmr_tradeoff_test") or []
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        ax.plot([c["lambda"] for c in curve], [c["ndcg@10"] for c in curve], "o-", label="NDCG@10")
        ax2 = ax.twinx()
        ax2.plot([c["lambda"] for c in curve], [c["ild@10"] for c in curve], "s--", color="C1")
        ax.set_xlabel("MMR lambda")
        ax.set_ylabel("NDCG@10")
        ax2.set_ylabel("ILD@10", color="C1")
        ax.set_title("Pipeline: MMR trade-off (test users)")
        fig.tight_layout()
        fig.savefig(out / "mmr_tradeoff.png")
        plt.close(fig)
        written.append("mmr_tradeoff.png")
    return written


def write_report(result: dict[str, Any], out: str | Path, *, plots: bool = True) -> list[Path]:
    """Write ``eval.md``, ``eval.json`` and the plots into ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    result["plots"] = plot(result, out) if plots else []
    md = out / "eval.md"
    md.write_text(render_markdown(result))
    js = out / "eval.json"
    js.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return [md, js, *(out / p for p in result["plots"])]


def _json_default(o: object) -> object:
    if hasattr(o, "item"):
        return o.item()  # numpy scalars
    if isinstance(o, set):
        return sorted(o)
    return str(o)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.evaluation.report DIR/eval.json ...``: render each ``eval.md`` again
    from its JSON (after a change to the report, the verdicts' rules included), without
    running anything: the same numbers, no new look at any split."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.evaluation.report")
    ap.add_argument("results", type=Path, nargs="+", help="eval.json files")
    args = ap.parse_args(argv)
    for path in args.results:
        md = path.with_name("eval.md")
        text = render_markdown(json.loads(path.read_text()))
        md.write_text(text + _appended(md.read_text() if md.is_file() else "", text))
        print(f"wrote {md}")
    return 0


def _appended(old: str, new: str) -> str:
    """The sections of ``old`` after the last one that ``new`` has too: what another job
    appended to the report (the served evaluation's segments), kept in their order."""
    titles = {line for line in new.splitlines() if line.startswith("## ")}
    parts = ["## " + part for part in old.split("\n## ")[1:]]
    known = [i for i, part in enumerate(parts) if part.splitlines()[0] in titles]
    kept = parts[known[-1] + 1 :] if known else []
    return "".join("\n" + part.rstrip("\n") + "\n" for part in kept)


if __name__ == "__main__":
    raise SystemExit(main())
