"""Ingest: how many beacons ``/collect`` commits per second, and how fast it answers at half that.

Measured against ``bench/bare_app.py``, a Flask endpoint that answers 204 under the same
gunicorn settings, in the same run: the ratio is what the collector's own work costs.

1. Saturation: wrk keeps ``connections`` connections busy posting distinct beacons; the answered
   rate is the saturating rate (and its latencies those of a saturated server).
2. Half load: the open-loop client offers half the collector's saturating rate, to the
   collector and then to the bare app; p50/p99 count from when each request was due.
3. Every 2xx must be a committed row: the events table is counted afterwards.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from pathlib import Path

from bench import loadgen, profiling
from bench.cpu import cpu_seconds
from bench.loadgen import LoadResult
from bench.services import BareApp
from collector.store import open_store
from tests.support.processes import WebProcess, run_cli


@dataclass(frozen=True)
class Settings:
    """How long and how hard each ingest run is."""

    workers: int
    threads: int
    connections: int  # wrk's, at saturation
    seconds: float  # of each measured run
    warmup_seconds: float
    open_loop_connections: int


@dataclass(frozen=True)
class Saturated:
    """A saturation run and the server CPU it took, in milliseconds per answered request."""

    load: LoadResult
    cpu_ms_per_request: float
    answered_2xx_all_runs: int = 0  # of every saturation run, not only the median one


@dataclass(frozen=True)
class IngestFigures:
    store: str
    connections: int  # wrk's, at saturation
    saturated: Saturated
    at_half: LoadResult
    bare_at_half: LoadResult
    committed_rows: int
    answered_2xx: int


class BareBaseline:
    """The bare app, started once and measured at saturation and at each half-load rate."""

    def __init__(self, settings: Settings, log_dir: Path):
        self.settings = settings
        self.app = BareApp(log_dir, workers=settings.workers, threads=settings.threads)

    def __enter__(self) -> BareBaseline:
        self.app.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.app.stop()

    def saturate(self) -> Saturated:
        url = self.app.url + "/collect"
        _warm_up(url, self.settings)
        return _saturate_measuring_cpu(url, [self.app.pid, *self.app.worker_pids()], self.settings)

    def at_rate(self, rate: float) -> LoadResult:
        return loadgen.open_loop(
            self.app.url + "/collect",
            rate=rate,
            seconds=self.settings.seconds,
            connections=self.settings.open_loop_connections,
            run_hex=secrets.token_hex(4),
        )


def measure_collector(
    store_name: str,
    database_url: str,
    bare: BareBaseline,
    settings: Settings,
    env: dict[str, str],
    log_dir: Path,
    profile_dir: Path | None,
) -> tuple[IngestFigures, str]:
    """Saturate ``ks-collector web`` on ``database_url``, then offer it half that rate."""
    run_cli(["migrate"], env, database_url=database_url)
    web = WebProcess(
        env,
        workers=settings.workers,
        threads=settings.threads,
        database_url=database_url,
        log_dir=log_dir,
    ).start()
    profile = ""
    try:
        url = web.url + "/collect"
        warmup_rows = _warm_up(url, settings)
        recording = None
        if profile_dir is not None:
            recording = profiling.record(
                f"ingest {store_name}",
                web.master_pid,
                settings.seconds - 1,
                profile_dir,
                subprocesses=True,
            )
        saturated = _saturate_measuring_cpu(url, web.tree_pids(), settings)
        if recording is not None:
            profile = recording.finish()
        half = saturated.load.rate / 2
        at_half = loadgen.open_loop(
            url,
            rate=half,
            seconds=settings.seconds,
            connections=settings.open_loop_connections,
            run_hex=secrets.token_hex(4),
        )
    finally:
        web.terminate(check=False)
    figures = IngestFigures(
        store=store_name,
        connections=settings.connections,
        saturated=saturated,
        at_half=at_half,
        bare_at_half=bare.at_rate(half),
        committed_rows=count_events(database_url) - warmup_rows,
        answered_2xx=(saturated.answered_2xx_all_runs + at_half.requests - at_half.errors),
    )
    return figures, profile


# Saturation runs per server; the median one is reported. wrk opens its connections at once and
# the gunicorn workers race to accept them, so one run can land most of them on one worker and
# measure a third less than the next run does.
SATURATION_RUNS = 3


def _saturate_measuring_cpu(url: str, pids: list[int], settings: Settings) -> Saturated:
    """wrk at saturation, and the CPU the server's processes (``pids``) used meanwhile: the
    median of ``SATURATION_RUNS`` runs by rate."""
    runs = []
    for _ in range(SATURATION_RUNS if settings.seconds >= 2 else 1):
        cpu_before = cpu_seconds(pids)
        load = loadgen.saturate(
            url,
            seconds=settings.seconds,
            connections=settings.connections,
            run_hex=secrets.token_hex(4),
        )
        cpu = cpu_seconds(pids) - cpu_before
        runs.append(Saturated(load, cpu * 1000 / load.requests if load.requests else 0.0))
    runs.sort(key=lambda run: run.load.rate)
    answered = sum(run.load.requests - run.load.errors for run in runs)
    return dataclasses.replace(runs[len(runs) // 2], answered_2xx_all_runs=answered)


def _warm_up(url: str, settings: Settings) -> int:
    """Open connections, fill caches and pools, start SQLite's WAL; returns the 2xx answers
    (not measured, but committed like any other beacon)."""
    if settings.warmup_seconds <= 0:
        return 0
    warmup = loadgen.saturate(
        url,
        seconds=settings.warmup_seconds,
        connections=settings.connections,
        run_hex=secrets.token_hex(4),
    )
    return warmup.requests - warmup.errors


def count_events(database_url: str) -> int:
    store = open_store(database_url)
    try:
        with store.reading() as cursor:
            cursor.execute("SELECT COUNT(*) FROM events")
            return int(cursor.fetchone()[0])
    finally:
        store.close()
