"""`python -m devtools.bench.combine DIR [DIR ...] [--out DIR]`: merge the results.json of
separate bench runs (e.g. three `make bench`) into one spread table: each figure's
min/median/max over the runs, the worst ratio to its same-run baseline, pass judged on the
worst run, and the load generator's cores next to the cores left free.

The bench itself writes its output through `write` too, so `--runs 3` and three combined
single runs give the same table.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from devtools.bench import report, spread
from devtools.bench.report import Run


def passes_of(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped by the pass (`--runs`) they belong to; one pass if none is recorded."""
    grouped: dict[int, list[Run]] = {}
    for run in runs:
        grouped.setdefault(int(run.details.get("pass", 0)), []).append(run)
    return [grouped[k] for k in sorted(grouped)]


def write(runs: list[Run], out: Path, meta: dict[str, Any]) -> str:
    """Print the spread table; write results.json (every run + the summary) and
    results.md. Returns the table."""
    out.mkdir(parents=True, exist_ok=True)
    passes = passes_of(runs)
    cpus = int(meta.get("cpus") or os.cpu_count() or 1)
    spreads = spread.spread(passes, cpus)
    failed = spread.errors(passes)
    text = spread.table(spreads, failed, len(passes))
    print("\n" + text)
    report.write_json(runs, out, meta, [s.as_dict() for s in spreads])
    note = (
        f"{len(passes)} run(s); `worst of N` is the worst run's value, ratio (worst) the "
        "worst run's ratio to its same-run baseline; result judged on the worst run; "
        "loadgen / free cores: cores the load generator used in the system's measured "
        "window (worst run) / cores left after it and the servers, or the machine's idle "
        "cores over the scenario when fewer (other work on a shared machine).\n\n"
    )
    (out / "results.md").write_text(
        f"`{meta.get('command', '')}`\n\n"
        + note
        + spread.markdown(spreads, failed, len(passes))
        + "\n"
    )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench.combine", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="folders with a results.json")
    parser.add_argument("--out", type=Path, default=Path("bench-combined"))
    args = parser.parse_args(argv)
    runs: list[Run] = []
    commands, cpus, offset = [], 0, 0
    for folder in args.dirs:
        meta, found = report.read_json(folder / "results.json")
        commands.append(meta.get("command", str(folder)))
        cpus = cpus or int(meta.get("cpus") or 0)
        # Renumber the passes so each file's stay apart from the others'.
        passes = passes_of(found)
        for i, group in enumerate(passes):
            for run in group:
                run.details["pass"] = offset + i
        offset += len(passes)
        runs += found
    meta = {
        "command": "; ".join(dict.fromkeys(commands)) + f" (combined: {len(args.dirs)} files)",
        "cpus": cpus or os.cpu_count(),
        "runs": offset,
        "combined_from": [str(d) for d in args.dirs],
    }
    write(runs, args.out, meta)
    print(f"results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
