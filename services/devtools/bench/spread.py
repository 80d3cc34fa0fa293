"""Figures over repeated runs: min / median / max, the worst ratio, pass on the worst.

The targets are judged on N runs of the same scenario (`--runs N`, or N `make bench`
results merged by `devtools.bench.combine`), worst of N reported, with the load
generator's CPU next to every figure so a reader can see when the client was the limit.
Pure functions over `Run`s: no servers, unit-tested in tests/test_bench_spread.py.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from devtools.bench.report import Figure, Run, fmt

# Units where a smaller figure is the better one (latency, memory, CPU cost, losses).
_LOWER_UNITS = {"ms", "s", "us", "KiB", "MiB", "frames", "% of a core", "cores"}


def lower_is_better(figure: Figure) -> bool:
    """A figure's direction, from its target when it has one (`<= 25 ms`, `>= 5000/s`,
    `ratio >= 0.6`, `0`), else from its unit (`ms` lower, `msg/s` higher)."""
    target = figure.target.strip()
    if target.startswith(("<=", "<", "0", "exactly")) or target == "0":
        return True
    if ">=" in target or target.startswith(">"):
        return False
    return figure.unit in _LOWER_UNITS


def ratio_of(figure: Figure) -> float | None:
    if figure.ratio is not None:
        return figure.ratio
    if figure.baseline:
        return figure.value / figure.baseline
    return None


@dataclass
class Spread:
    """One figure over N runs."""

    scenario: str
    name: str
    unit: str
    runs: int  # how many runs had this figure
    values: list[float]
    baselines: list[float | None]
    ratios: list[float | None]
    target: str = ""
    lower_is_better: bool = False
    passes: list[bool | None] = field(default_factory=list)
    # Cores the load generator used (worst run) and cores left free in that run.
    loadgen_cores: float | None = None
    free_cores: float | None = None

    @property
    def worst(self) -> float:
        return max(self.values) if self.lower_is_better else min(self.values)

    @property
    def worst_ratio(self) -> float | None:
        """The ratio of the worst run, as a lower-is-better figure's ratio grows when it
        gets worse and a higher-is-better one's shrinks."""
        known = [r for r in self.ratios if r is not None]
        if not known:
            return None
        return max(known) if self.lower_is_better else min(known)

    @property
    def passed(self) -> bool | None:
        """Pass only if every run passed: the target is judged on the worst."""
        known = [p for p in self.passes if p is not None]
        return all(known) if known else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            worst=self.worst,
            min=min(self.values),
            median=statistics.median(self.values),
            max=max(self.values),
            worst_ratio=self.worst_ratio,
            passed=self.passed,
        )
        return out


def loadgen_load(run: Run, cpus: int) -> tuple[float, float] | None:
    """(cores the load generator used, cores left free) during the system's measured
    window, from a scenario's details (`loadgen_cpu` and `server_cpu`, system side)."""
    for where in (run.details.get("gateway"), run.details):
        if isinstance(where, dict) and isinstance(where.get("loadgen_cpu"), int | float):
            loadgen = float(where["loadgen_cpu"])
            servers = where.get("server_cpu")
            used = sum(servers.values()) if isinstance(servers, dict) else 0.0
            free = cpus - loadgen - used
            # On a shared machine the others' load takes cores too: the machine's idle
            # cores over the scenario (bench __main__) when they are fewer.
            machine = run.details.get("machine")
            if isinstance(machine, dict) and "idle_cores_mean" in machine:
                free = min(free, float(machine["idle_cores_mean"]))
            return loadgen, round(free, 3)
    return None


def spread(passes: list[list[Run]], cpus: int) -> list[Spread]:
    """Figures of N passes (each a list of scenario runs) grouped by scenario and figure
    name, in the order they first appear."""
    out: dict[tuple[str, str], Spread] = {}
    load: dict[str, list[tuple[float, float]]] = {}
    for runs in passes:
        for run in runs:
            if run.error:
                continue
            seen = loadgen_load(run, cpus)
            if seen is not None:
                load.setdefault(run.scenario, []).append(seen)
            for f in run.figures:
                key = (run.scenario, f.name)
                s = out.get(key)
                if s is None:
                    s = out[key] = Spread(
                        run.scenario,
                        f.name,
                        f.unit,
                        0,
                        [],
                        [],
                        [],
                        target=f.target,
                        lower_is_better=lower_is_better(f),
                    )
                s.runs += 1
                s.values.append(float(f.value))
                s.baselines.append(f.baseline)
                s.ratios.append(ratio_of(f))
                s.passes.append(f.passed)
    for s in out.values():
        seen_load = load.get(s.scenario)
        if seen_load:
            s.loadgen_cores = max(x for x, _ in seen_load)
            s.free_cores = min(y for _, y in seen_load)
    return list(out.values())


def errors(passes: list[list[Run]]) -> list[tuple[str, str]]:
    return [(r.scenario, r.error) for runs in passes for r in runs if r.error]


def _range(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    return f"{fmt(min(values))}..{fmt(statistics.median(values))}..{fmt(max(values))}"


def _load(s: Spread, first: bool) -> str:
    if not first or s.loadgen_cores is None or s.free_cores is None:
        return ""
    return f"{s.loadgen_cores:.2f} / {s.free_cores:.2f}"


COLUMNS = (
    "figure",
    "worst of N",
    "min..median..max",
    "baseline (median)",
    "ratio (worst)",
    "ratio min..max",
    "target",
    "result",
    "loadgen / free cores",
)


def rows(spreads: list[Spread], failed: list[tuple[str, str]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    shown: set[str] = set()
    for s in spreads:
        baselines = [b for b in s.baselines if b is not None]
        ratios = [r for r in s.ratios if r is not None]
        verdict = "" if s.passed is None else ("pass" if s.passed else "MISS")
        out.append(
            (
                s.name,
                f"{fmt(s.worst)} {s.unit}",
                _range(s.values),
                fmt(statistics.median(baselines)) if baselines else "-",
                fmt(s.worst_ratio),
                _range([r for r in ratios if not math.isnan(r)]),
                s.target,
                verdict,
                _load(s, s.scenario not in shown),
            )
        )
        shown.add(s.scenario)
    for scenario, error in failed:
        out.append((scenario, "-", "-", "-", "-", "-", "-", f"SKIPPED: {error}"[:70], ""))
    return out


def _header(runs: int) -> tuple[str, ...]:
    return tuple(f"worst of {runs}" if c == "worst of N" else c for c in COLUMNS)


def table(spreads: list[Spread], failed: list[tuple[str, str]], runs: int) -> str:
    body = rows(spreads, failed)
    header = _header(runs)
    all_rows = [header, *body]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in all_rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(spreads: list[Spread], failed: list[tuple[str, str]], runs: int) -> str:
    header = _header(runs)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows(spreads, failed):
        cells = list(row)
        if cells[7] == "MISS":
            cells[7] = "**miss**"
        out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(out)
