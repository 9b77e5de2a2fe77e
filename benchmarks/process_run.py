"""Run a command as a fresh process and measure it whole: wall clock from spawn to exit, CPU time, and
the peak memory of its process tree (every descendant: worker pools, Ray's raylet, GCS and workers).

Memory is sampled with psutil: the peak of the tree's summed RSS every ``interval`` seconds (shared
pages, such as torch's libraries mapped by several processes, count once per process) and of its summed
PSS every ``pss_interval`` seconds (shared pages split between the processes that map them; the fairer
figure for a multi-process tree). Reading PSS makes the kernel walk each process's page tables, some
6 ms per Ray process: sampled every second it costs a ten-process tree about 6% of one core. ``max_rss_mb`` is the kernel's exact peak RSS of the largest single process that was waited for
(``wait4``'s ``ru_maxrss``). Descendants still alive after the command exits are reported, then
terminated (by their process ids) so that they cannot load the next run.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MB = 1024 * 1024


@dataclass
class ProcessRun:
    argv: list[str]
    exit_code: int
    wall_s: float
    cpu_s: float  # user + system of the process and the descendants it waited for
    peak_rss_mb: float  # tree, summed
    peak_pss_mb: float  # tree, summed
    max_rss_mb: float  # largest single process
    processes: int  # distinct processes seen in the tree
    leftovers: list[str] = field(default_factory=list)


def pss_bytes(pid: int) -> int:
    """The process's proportional set size, from /proc/<pid>/smaps_rollup (0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler:
    """Samples a process tree's summed RSS and PSS on a background thread, keeping the peaks."""

    def __init__(self, pid: int, interval: float, pss_interval: float) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.pss_interval = pss_interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.seen: dict[int, psutil.Process] = {}
        self._next_pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        with_pss = time.monotonic() >= self._next_pss
        if with_pss:
            self._next_pss = time.monotonic() + self.pss_interval
        rss = pss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                continue
            if with_pss:
                pss += pss_bytes(p.pid)
            self.seen.setdefault(p.pid, p)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def leftover_processes(seen: dict[int, psutil.Process], root_pid: int, grace_s: float) -> list[str]:
    """Descendants still running ``grace_s`` after the command exited; they are terminated here."""
    deadline = time.monotonic() + grace_s
    alive = [p for pid, p in seen.items() if pid != root_pid and p.is_running()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if p.is_running()]
    names = []
    for p in alive:
        try:
            names.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.terminate()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)
    return names


def run_measured(
    argv: list[str],
    env: dict[str, str],
    log: Path,
    *,
    interval: float = 0.2,
    pss_interval: float = 1.0,
    grace_s: float = 5.0,
) -> ProcessRun:
    """Run ``argv`` (output to ``log``) and measure it from spawn to exit."""
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, interval, pss_interval)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop()
    return ProcessRun(
        argv=argv,
        exit_code=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=sampler.peak_rss / MB,
        peak_pss_mb=sampler.peak_pss / MB,
        max_rss_mb=usage.ru_maxrss / 1024,  # kilobytes on Linux
        processes=len(sampler.seen),
        leftovers=leftover_processes(sampler.seen, proc.pid, grace_s),
    )
