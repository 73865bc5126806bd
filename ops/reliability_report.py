"""The reliability report: what each fault scenario sent, got back and kept.

Tests append one JSON line per scenario to the file named by ``RECSYS_RELIABILITY_REPORT``
(nothing is written when it is unset); ``python -m ops.reliability_report [FILE]``
prints them as a Markdown table - requests sent, answers by status code, degraded answers,
events acknowledged vs found afterwards (and, where a scenario counts them, events stored or
applied twice), recovery time - for ``make reliability`` and the README.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.config import Settings


@dataclass
class Scenario:
    """Figures of one fault scenario."""

    name: str
    requests: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    degraded: int = 0
    acknowledged: int | None = None
    found: int | None = None
    recovery_s: float | None = None
    duplicates: int | None = None  # events stored or applied more than once

    def answer(self, code: str, degraded: bool = False) -> None:
        self.requests += 1
        self.codes[code] += 1
        self.degraded += int(degraded)


def record(scenario: Scenario) -> None:
    """Append ``scenario`` to the report file, if ``RECSYS_RELIABILITY_REPORT`` names one."""
    path = Settings().reliability_report  # read per call: tests set it per scenario run
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({**asdict(scenario), "codes": dict(scenario.codes)}) + "\n")


def load(path: Path) -> list[Scenario]:
    scenarios = []
    for line in path.read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            data["codes"] = Counter(data.get("codes", {}))
            scenarios.append(Scenario(**data))
    return scenarios


def render(scenarios: list[Scenario]) -> str:
    """A Markdown table, one row per scenario."""

    def opt(value: object, fmt: str = "{}") -> str:
        return "-" if value is None else fmt.format(value)

    rows = [
        "| scenario | requests | answers by code | degraded | events acked / found | recovery |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for s in scenarios:
        codes = ", ".join(f"{c} {n}" for c, n in s.codes.most_common())
        kept = f"{opt(s.acknowledged)} / {opt(s.found)}"
        kept += "" if s.duplicates is None else f", {s.duplicates} twice"
        rows.append(
            f"| {s.name} | {s.requests} | {codes or '-'} | {s.degraded} | {kept} "
            f"| {opt(s.recovery_s, '{:.1f} s')} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    default = Settings().reliability_report or Path("var/reliability/report.jsonl")
    path = Path(args[0]) if args else default
    if not path.exists():
        print(f"no reliability report at {path}: run `make reliability`", file=sys.stderr)
        return 1
    print(render(load(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
