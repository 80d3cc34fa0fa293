"""Figures, the printed table, results.json and the PNG plots."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: float | None = None
    target: str = ""
    passed: bool | None = None
    ratio: float | None = None


@dataclass
class Run:
    scenario: str
    figures: list[Figure]
    details: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return math.nan
    k = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}"


def table(runs: list[Run]) -> str:
    rows = [("figure", "value", "baseline", "ratio", "target", "result")]
    for run in runs:
        if run.error:
            rows.append((run.scenario, "-", "-", "-", "-", f"SKIPPED: {run.error}"[:70]))
        for f in run.figures:
            ratio = f.ratio
            if ratio is None and f.baseline:
                ratio = f.value / f.baseline
            verdict = "" if f.passed is None else ("pass" if f.passed else "MISS")
            rows.append(
                (
                    f.name,
                    f"{fmt(f.value)} {f.unit}",
                    fmt(f.baseline),
                    fmt(ratio),
                    f.target,
                    verdict,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(runs: list[Run]) -> str:
    out = ["| figure | value | baseline | ratio | target | result |", "|---|---|---|---|---|---|"]
    for run in runs:
        if run.error:
            out.append(f"| {run.scenario} | - | - | - | - | skipped: {run.error} |")
        for f in run.figures:
            ratio = (
                f.ratio if f.ratio is not None else (f.value / f.baseline if f.baseline else None)
            )
            verdict = "" if f.passed is None else ("pass" if f.passed else "**miss**")
            out.append(
                f"| {f.name} | {fmt(f.value)} {f.unit} | {fmt(f.baseline)} | {fmt(ratio)} | "
                f"{f.target} | {verdict} |"
            )
    return "\n".join(out)


def _slim(details: Any) -> Any:
    """Keep results.json readable: long sample lists become summaries."""
    if isinstance(details, dict):
        return {k: _slim(v) for k, v in details.items() if k != "latencies_ms"}
    if isinstance(details, list) and len(details) > 400:
        return [*details[:400], "..."]
    return details


def write_json(
    runs: list[Run], out: Path, meta: dict[str, Any], summary: list[dict[str, Any]] | None = None
) -> Path:
    """Every run's figures and details; with `summary`, each figure over the runs
    (devtools.bench.spread: min/median/max, worst, worst ratio, pass on the worst)."""
    path = out / "results.json"
    data: dict[str, Any] = {
        "meta": meta,
        "runs": [
            {
                "scenario": r.scenario,
                "error": r.error,
                "figures": [asdict(f) for f in r.figures],
                "details": _slim(r.details),
            }
            for r in runs
        ],
    }
    if summary is not None:
        data["summary"] = summary
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def read_json(path: Path) -> tuple[dict[str, Any], list[Run]]:
    """A results.json back as (meta, runs): what `combine` merges."""
    data = json.loads(path.read_text())
    known = {f.name for f in fields(Figure)}  # a newer file's extra fields are left out
    runs = [
        Run(
            r["scenario"],
            [Figure(**{k: v for k, v in f.items() if k in known}) for f in r.get("figures", [])],
            r.get("details", {}),
            r.get("error", ""),
        )
        for r in data.get("runs", [])
    ]
    return data.get("meta", {}), runs


def plots(runs: list[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    by_name = {r.scenario: r for r in runs if not r.error}
    if "latency" in by_name:
        d = by_name["latency"].details
        fig, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4))
        for label, key in (("system (gateway A -> B)", "gateway"), ("bare baseline", "baseline")):
            values = d[key]["latencies_ms"]
            if not values:
                continue
            hist.hist(
                values,
                bins=100,
                alpha=0.6,
                label=label,
                range=(0, max(1.0, percentile(values, 99.9))),
            )
            n = len(values)
            cdf.plot(values, [(i + 1) / n for i in range(n)], label=label)
        hist.set_xlabel("latency (ms)")
        hist.set_ylabel("messages")
        hist.legend()
        cdf.set_xscale("log")
        cdf.set_xlabel("latency (ms, log)")
        cdf.set_ylabel("fraction")
        cdf.axvline(25, color="red", linestyle="--", label="p99 target")
        cdf.legend()
        fig.suptitle("End-to-end latency distribution")
        written.append(_save(fig, out / "latency.png"))
        per_second = d["gateway"].get("per_second")
        if per_second:
            written.append(_latency_timeline(plt, per_second, out / "latency-timeline.png"))
    for name, title, unit in (
        ("fanout", "Fan-out: frames delivered over time", "frames/s"),
        ("durable", "Durable send: acks over time", "acks/s"),
    ):
        if name not in by_name:
            continue
        d = by_name[name].details
        fig, ax = plt.subplots(figsize=(9, 4))
        for label, key in (("system", "gateway"), ("bare baseline", "baseline")):
            series = d[key].get("timeline", [])
            ax.plot([i * 0.1 for i in range(len(series))], series, label=label)
        ax.set_xlabel("seconds")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
        written.append(_save(fig, out / f"{name}.png"))
    if "archive" in by_name:
        d = by_name["archive"].details
        series = d.get("count_timeline", [])
        if series:
            fig, ax = plt.subplots(figsize=(9, 4))
            ax.plot([t for t, _ in series], [n for _, n in series], label="rows in Postgres")
            ax.set_xlabel("seconds since the replicas started")
            ax.set_ylabel("rows")
            ax.set_title("Archive drain")
            ax.legend()
            written.append(_save(fig, out / "archive.png"))
    if "history" in by_name:
        d = by_name["history"].details
        fig, ax = plt.subplots(figsize=(9, 4))
        for key, samples in d.get("samples_ms", {}).items():
            if samples:
                n = len(samples)
                ax.plot(sorted(samples), [(i + 1) / n for i in range(n)], label=key)
        ax.set_xscale("log")
        ax.set_xlabel("ms (log)")
        ax.set_ylabel("fraction")
        ax.set_title("History query latency")
        ax.legend()
        written.append(_save(fig, out / "history.png"))
    return written


def _latency_timeline(plt: Any, per_second: dict[str, Any], path: Path) -> Path:
    """p99 of each second next to who used the CPU in it: a tail and its cause."""
    fig, (lat, cpu) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    p99 = per_second.get("latency_p99_ms", [])
    lat.plot(range(len(p99)), p99, label="p99 of the messages sent in that second")
    lat.set_yscale("log")
    lat.set_ylabel("ms (log)")
    lat.legend()
    for name, series in per_second.get("procs", {}).items():
        cpu.plot(range(len(series)), series, label=name)
    others = per_second.get("others", [])
    cpu.plot(range(len(others)), others, "k--", label="other processes (not ours)")
    cpu.set_xlabel("second of the run")
    cpu.set_ylabel("cores")
    cpu.legend(fontsize="small", ncol=2)
    fig.suptitle("Latency per second and CPU per process (system run)")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
