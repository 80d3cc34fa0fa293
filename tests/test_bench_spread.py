"""The bench's figures over repeated runs (devtools.bench.spread, .combine): what the
targets are judged on ("three runs, worst of three"), so the reader of the table must be
able to trust the worst, the spread and the verdict. Pure logic: no servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from devtools.bench import combine, report, spread
from devtools.bench.report import Figure, Run


def _latency(p99: float, base: float, loadgen: float = 0.5) -> Run:
    return Run(
        "latency",
        [
            Figure("p99", p99, "ms", baseline=base, target="<= 10 ms", passed=p99 <= 10),
            Figure("p50", p99 / 4, "ms", baseline=base / 4),
        ],
        {"gateway": {"loadgen_cpu": loadgen, "server_cpu": {"gw-1": 0.3, "gw-2": 0.2}}},
    )


def _fanout(rate: float, base: float) -> Run:
    return Run(
        "fanout",
        [
            Figure(
                "frames/s",
                rate,
                "frames/s",
                baseline=base,
                target="ratio >= 0.6 per gateway process",
                passed=rate / base >= 0.6,
            )
        ],
    )


def _by_name(spreads: list[spread.Spread]) -> dict[str, spread.Spread]:
    return {s.name: s for s in spreads}


def test_worst_is_the_highest_latency_and_the_lowest_throughput() -> None:
    passes = [
        [_latency(4.0, 2.0), _fanout(900, 1000)],
        [_latency(12.0, 3.0), _fanout(500, 1000)],
        [_latency(6.0, 1.0), _fanout(700, 700)],
    ]
    s = _by_name(spread.spread(passes, cpus=2))
    p99, rate = s["p99"], s["frames/s"]
    assert (p99.worst, rate.worst) == (12.0, 500)
    d = p99.as_dict()
    assert (d["min"], d["median"], d["max"]) == (4.0, 6.0, 12.0)
    # The worst ratio is the worst run's: highest for latency (12/3 = 4 < 6/1 = 6: the
    # ratio is taken per run, against that run's own baseline), lowest for throughput.
    assert p99.worst_ratio == 6.0
    assert rate.worst_ratio == 0.5


def test_pass_is_judged_on_the_worst_run() -> None:
    good = [[_latency(4.0, 2.0)], [_latency(5.0, 2.0)]]
    assert _by_name(spread.spread(good, 2))["p99"].passed is True
    one_bad = [*good, [_latency(11.0, 2.0)]]
    assert _by_name(spread.spread(one_bad, 2))["p99"].passed is False
    # A figure without a target has no verdict at all.
    assert _by_name(spread.spread(one_bad, 2))["p50"].passed is None


def test_loadgen_cores_and_free_cores_come_from_the_worst_run() -> None:
    passes = [[_latency(4.0, 2.0, loadgen=0.4)], [_latency(4.0, 2.0, loadgen=0.9)]]
    s = _by_name(spread.spread(passes, cpus=2))["p99"]
    assert s.loadgen_cores == 0.9
    assert s.free_cores == pytest.approx(2 - 0.9 - 0.5)
    table = spread.table(spread.spread(passes, 2), [], 2)
    assert "0.90 / 0.60" in table
    assert "worst of 2" in table


@pytest.mark.parametrize(
    ("figure", "lower"),
    [
        (Figure("x", 1, "ms", target="<= 25 ms"), True),
        (Figure("x", 1, "/s", target=">= 0.9 x baseline"), False),
        (Figure("x", 1, "frames", target="0"), True),
        (Figure("x", 1, "rows", target="exactly 100,000"), True),
        (Figure("x", 1, "KiB"), True),
        (Figure("x", 1, "msg/s"), False),
    ],
)
def test_direction_of_a_figure(figure: Figure, lower: bool) -> None:
    assert spread.lower_is_better(figure) is lower


def test_a_failed_scenario_is_listed_not_dropped() -> None:
    passes = [[_latency(4.0, 2.0)], [Run("latency", [], error="gateway did not start")]]
    spreads = spread.spread(passes, 2)
    assert _by_name(spreads)["p99"].runs == 1
    table = spread.table(spreads, spread.errors(passes), 2)
    assert "SKIPPED: gateway did not start" in table


def test_combine_merges_separate_results_into_one_spread(tmp_path: Path) -> None:
    folders = []
    for i, p99 in enumerate((4.0, 9.0, 6.0)):
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        meta = {"command": "python -m devtools.bench", "cpus": 2}
        report.write_json([_latency(p99, 2.0)], folder, meta)
        folders.append(str(folder))
    out = tmp_path / "combined"
    assert combine.main([*folders, "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    p99 = next(s for s in data["summary"] if s["name"] == "p99")
    assert (p99["runs"], p99["min"], p99["median"], p99["max"]) == (3, 4.0, 6.0, 9.0)
    assert p99["worst"] == 9.0 and p99["passed"] is True
    assert data["meta"]["runs"] == 3
    assert "| p99 | 9.00 ms | 4.00..6.00..9.00 |" in (out / "results.md").read_text()
