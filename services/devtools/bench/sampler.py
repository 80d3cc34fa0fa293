"""What the machine is doing while a scenario measures: CPU per process per second, and
the waits between scenarios.

A latency tail is only explained by what else ran at that moment, so `CpuSampler` records,
once per second: the cores each named process used, the cores the whole machine used
(`/proc/stat`, so other people's work on a shared machine shows up as "others"), its
iowait, and the kernel's dirty + writeback page cache (a previous scenario's stream files
still being written out compete with this one's JetStream writes).

`wait_quiet` is the bench's isolation between scenarios: it polls until the machine is
quiet enough (our leftover processes gone, dirty pages written back) with a deadline,
and says how long it waited and what it saw.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psutil

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_times() -> tuple[float, float, float]:
    """(busy, iowait, total) seconds of all cores since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0, 0.0
    idle, iowait = fields[3], fields[4] if len(fields) > 4 else 0
    total = sum(fields[:8])  # guest time is already inside user/nice
    return (total - idle - iowait) / _TICKS, iowait / _TICKS, total / _TICKS


def dirty_mib() -> float:
    """Dirty + writeback page cache in MiB (what the kernel still has to write to disk)."""
    try:
        with open("/proc/meminfo") as f:
            values = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0.0
    kib = sum(int(values.get(k, "0 kB").split()[0]) for k in ("Dirty", "Writeback"))
    return kib / 1024


class CpuSampler:
    """Samples the named pids and the machine every `interval` seconds in a thread."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0) -> None:
        self.interval = interval
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            try:
                self.procs[name] = psutil.Process(pid)
            except psutil.Error:
                pass
        self.series: dict[str, list[float]] = {name: [] for name in self.procs}
        self.machine: list[float] = []
        self.iowait: list[float] = []
        self.dirty: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _cpu(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, p in self.procs.items():
            try:
                t = p.cpu_times()
                out[name] = t.user + t.system
            except psutil.Error:
                out[name] = float("nan")
        return out

    def _loop(self) -> None:
        last, (busy0, io0, tot0), t0 = self._cpu(), _machine_times(), time.monotonic()
        while not self._stop.wait(self.interval):
            now, (busy1, io1, tot1), t1 = self._cpu(), _machine_times(), time.monotonic()
            wall = max(t1 - t0, 1e-6)
            for name in self.series:
                self.series[name].append(round((now[name] - last[name]) / wall, 3))
            cores = (tot1 - tot0) / wall  # = number of cores, measured
            self.machine.append(round((busy1 - busy0) / wall, 3))
            self.iowait.append(round((io1 - io0) / wall / max(cores, 1e-6), 3))
            self.dirty.append(round(dirty_mib(), 1))
            last, busy0, io0, tot0, t0 = now, busy1, io1, tot1, t1

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop; per second: cores per process, machine cores busy, the rest ("others":
        processes not ours), iowait share, dirty MiB."""
        self._stop.set()
        self._thread.join(5)
        ours = [
            sum(v for v in values if v == v) for values in zip(*self.series.values(), strict=False)
        ]
        others = [round(max(m - o, 0.0), 3) for m, o in zip(self.machine, ours, strict=False)]
        return {
            "interval_s": self.interval,
            "procs": self.series,
            "machine_busy": self.machine,
            "others": others,
            "iowait": self.iowait,
            "dirty_mib": self.dirty,
        }


def summary(sampled: dict[str, Any], cpus: int) -> dict[str, float]:
    """Mean busy and idle cores of the machine over a sampled stretch, and the busiest
    second: whether a figure was measured on a machine with room to spare."""
    busy = sampled["machine_busy"] or [0.0]
    mean = sum(busy) / len(busy)
    return {
        "busy_cores_mean": round(mean, 3),
        "busy_cores_max": max(busy),
        "idle_cores_mean": round(max(cpus - mean, 0.0), 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _our_leftovers() -> list[str]:
    """Processes this bench started that are still alive (a scenario's servers, load
    workers, Postgres backends), other than multiprocessing's own resource tracker."""
    names = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" not in cmdline:
            names.append(f"{child.pid} {cmdline[:80]}")
    return names


def wait_quiet(
    max_rise: float = 0.3, settle: float = 2.0, deadline: float = 30.0
) -> dict[str, Any]:
    """Between scenarios: wait until nothing of ours from the one before is left (no child
    process alive), the page cache is written out (`sync`: a previous stream's files must
    not be flushed during this scenario's JetStream writes), and the machine's busy cores
    have stopped falling for `settle` seconds (within `max_rise` of the lowest of the last
    few seconds: on a shared machine other people's load never ends, so the condition is
    "nothing is winding down", not "idle"). Gives up at `deadline` and says so."""
    began = time.monotonic()
    dirty_before = dirty_mib()
    os.sync()
    samples: list[float] = []
    quiet_since: float | None = None
    busy0, _, _ = _machine_times()
    t0 = time.monotonic()
    while True:
        time.sleep(0.5)
        busy1, _, _ = _machine_times()
        t1 = time.monotonic()
        busy = (busy1 - busy0) / max(t1 - t0, 1e-6)
        busy0, t0 = busy1, t1
        samples.append(round(busy, 2))
        leftovers = _our_leftovers()
        quiet = not leftovers and busy <= min(samples[-12:]) + max_rise
        if quiet:
            quiet_since = quiet_since or t1
        else:
            quiet_since = None
        settled = quiet_since is not None and t1 - quiet_since >= settle
        if settled or t1 - began >= deadline:
            return {
                "waited_s": round(t1 - began, 1),
                "quiet": settled,
                "leftovers": leftovers,
                "busy_cores": samples,
                "dirty_mib_before_sync": round(dirty_before, 1),
            }
