"""`python -m devtools.bench [--only SCENARIO ...] [--scale small|full] [--out DIR]`.

Starts NATS, Postgres, the services and a bare baseline as processes (or, with
--gateway-url, drives a deployed gateway), runs each scenario next to its baseline,
prints a table and writes results.json, results.md and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from devtools.bench import combine, report, sampler, ws_scenarios
from devtools.bench.cluster import BENCH_SECRET, Missing, mint_token
from devtools.bench.report import Run
from devtools.bench.ws_scenarios import Ctx

SCENARIOS: dict[str, Callable[[Ctx], Run]] = {
    "fanout": ws_scenarios.fanout,
    "latency": ws_scenarios.latency,
    "durable": ws_scenarios.durable,
}


def _register_optional() -> None:
    from devtools.bench import nats_scenarios

    SCENARIOS["archive"] = nats_scenarios.archive
    SCENARIOS["history"] = nats_scenarios.history
    SCENARIOS["connections"] = ws_scenarios.connections
    from devtools.bench import storm

    SCENARIOS["storm"] = storm.storm
    SCENARIOS["presence"] = nats_scenarios.presence
    from devtools.bench import rpc_scenarios

    SCENARIOS["rpc"] = rpc_scenarios.rpc
    from devtools.bench import search_scenarios

    SCENARIOS["search"] = search_scenarios.search
    from devtools.bench import userstate_scenarios

    SCENARIOS["userstate"] = userstate_scenarios.userstate
    from devtools.bench import scaleout

    SCENARIOS["scaleout"] = scaleout.scaleout


def _parse_url(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"ws://{url}")
    default = 443 if parts.scheme in ("https", "wss") else 80
    return parts.hostname or "127.0.0.1", parts.port or default


def main(argv: list[str] | None = None) -> int:
    _register_optional()
    parser = argparse.ArgumentParser(prog="python -m devtools.bench", description=__doc__)
    parser.add_argument(
        "--only", action="append", choices=list(SCENARIOS), help="run only these (repeatable)"
    )
    parser.add_argument("--scale", choices=["small", "full"], default="full")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--gateway-url",
        action="append",
        default=[],
        help="drive a deployed gateway (repeat for A and B), e.g. ws://gw-a:8000; plain ws only",
    )
    parser.add_argument(
        "--guest-secret",
        default=os.environ.get("BENCH_GUEST_SECRET", BENCH_SECRET),
        help="HS256 secret to mint guest tokens (the gateway's GATEWAY_GUEST_SECRET)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data and logs")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run every scenario N times (in N passes over the list); figures get their "
        "min/median/max and are judged on the worst",
    )
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="start each scenario at once, without waiting for the machine to settle",
    )
    args = parser.parse_args(argv)

    chosen = args.only or list(SCENARIOS)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    secret = args.guest_secret
    ctx = Ctx(
        full=args.scale == "full",
        workdir=workdir,
        gateway_urls=[_parse_url(u) for u in args.gateway_url],
        token_fn=lambda user: mint_token(user, secret),
        workers=args.workers,
    )
    runs: list[Run] = []
    began = time.monotonic()
    for index in range(args.runs):
        for name in chosen:
            label = f" run {index + 1}/{args.runs}" if args.runs > 1 else ""
            print(f"== {name} ({args.scale}){label}", flush=True)
            # Each run starts its own servers (the scenarios do), so runs are independent
            # samples; first the leftovers of the one before must be gone (sampler.py).
            settled = None if args.no_settle else sampler.wait_quiet()
            t0 = time.monotonic()
            here = workdir / f"run{index + 1}" if args.runs > 1 else workdir
            machine = sampler.CpuSampler({}).start()  # idle cores: was the machine shared?
            try:
                run = SCENARIOS[name](dataclasses.replace(ctx, workdir=here))
            except Missing as exc:
                run = Run(name, [], error=str(exc))
            except Exception as exc:  # one broken scenario must not lose the others' figures
                traceback.print_exc()
                run = Run(name, [], error=f"{type(exc).__name__}: {exc}")
            run.details["machine"] = sampler.summary(machine.stop(), os.cpu_count() or 1)
            run.details["seconds"] = round(time.monotonic() - t0, 1)
            run.details["pass"] = index
            if settled is not None:
                run.details["settle"] = settled
            runs.append(run)
            print(report.table([run]), flush=True)
            # Written as it goes: a long run that breaks off keeps the figures it has.
            report.write_json(runs, args.out, {"scale": args.scale, "partial": True})
    meta = {
        "scale": args.scale,
        "runs": args.runs,
        "command": "python -m devtools.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(time.monotonic() - began, 1),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": os.getloadavg(),
    }
    combine.write(runs, args.out, meta)
    try:
        for path in report.plots(runs, args.out):
            print(f"plot: {path}")
    except Exception as exc:
        print(f"plots failed: {exc}", file=sys.stderr)
    print(f"results: {args.out / 'results.json'}  ({meta['seconds']} s)")
    if not args.keep:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"data and logs kept in {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
