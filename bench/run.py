#!/usr/bin/env python3
"""Measure ks-collector against baselines measured in the same run, and check the targets.

    python bench/run.py             # full run, about 3 minutes (5 at most)
    python bench/run.py --quick     # shorter runs, about 75 s
    python bench/run.py --smoke     # seconds; proves the script works (tests/test_bench_smoke.py)
    python bench/run.py --profile   # also sample the web workers and the relay with py-spy
    python bench/run.py --quick --only relay --set KS_COLLECTOR_RELAY_CONCURRENCY=128

The table is printed and written to test-output/bench.md (``--output``); logs of every process
go beside it in bench-logs/, profiles in bench-profiles/. Needs wrk (``apt-get install wrk``),
Node.js and npm (the tag build), and PostgreSQL's server binaries for the PostgreSQL rows
(``apt-get install postgresql``; ``--no-postgres`` leaves them out). What each figure means and
how it is measured: bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Run as a script: make bench, collector and tests importable. Appended, so a PYTHONPATH
    # pointing at another copy of collector (to compare a change) takes precedence.
    sys.path.append(str(ROOT))

from bench import delivery, ingest, loadgen, profiling, relay_rate, tag_size  # noqa: E402
from bench.ingest import IngestFigures, Settings  # noqa: E402

# The targets of the issue.
INGEST_RATIO_TARGET = 0.60  # of the bare endpoint's saturating rate, durable commit included
INGEST_P99_TARGET_MS = 25.0  # at half the collector's saturating rate
RELAY_RATE_TARGET = 1000.0  # deliveries per second, one relay process, 50 ms upstream latency
RELAY_TARGET_LATENCY_MS = 50.0
DELIVERY_P50_TARGET_MS = 1000.0  # beacon → upstream, healthy upstream
TAG_GZIP_TARGET_BYTES = 1536  # 1.5 KB minified + gzipped

# Settings every collector process of the benchmark gets on top of the shipped defaults. The
# load generator is one client IP sending thousands of beacons a second; the per-IP limit
# (120/minute by default) would answer nearly all of them 429 and measure nothing else.
BENCH_ENV = {"KS_COLLECTOR_RATE_LIMIT_IP": "1000000000/minute"}

# A 1-minute load average above this before the run means something else was using the CPUs.
BUSY_LOAD = 0.5

# gunicorn as `ks-collector web` runs it by default: 2 workers x 4 threads (gthread).
WORKERS = 2
THREADS = 4


@dataclass(frozen=True)
class Mode:
    """How long and how big each part of a run is."""

    name: str
    ingest: Settings
    relay_events: int
    relay_baseline_seconds: float
    beacons: int
    beacon_rate: float
    postgres: bool


def _ingest_settings(seconds: float, warmup: float) -> Settings:
    return Settings(
        workers=WORKERS,
        threads=THREADS,
        connections=64,
        seconds=seconds,
        warmup_seconds=warmup,
        open_loop_connections=32,
    )


MODES = {
    "full": Mode("full", _ingest_settings(10, 2), 20_000, 5, 300, 20, True),
    "quick": Mode("quick", _ingest_settings(4, 1), 5_000, 2, 100, 20, True),
    "smoke": Mode("smoke", _ingest_settings(1, 0), 300, 0.5, 20, 20, False),
}


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    what: str
    measured: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    result: str = ""  # PASS, MISS or empty (for information)


@dataclass
class Report:
    """What a run found: table rows, notes under the table, and problems that void figures."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def verdict(met: bool) -> str:
    return "PASS" if met else "MISS"


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _ms(value: float) -> str:
    return f"{value:,.1f} ms" if value < 100 else f"{value:,.0f} ms"


# ---- the parts ---------------------------------------------------------------------------------


def add_ingest(report: Report, figures: IngestFigures, bare: ingest.Saturated) -> None:
    saturated, at_half, bare_half = figures.saturated.load, figures.at_half, figures.bare_at_half
    ratio = saturated.rate / bare.load.rate if bare.load.rate else 0.0
    store = figures.store
    if figures.committed_rows < figures.answered_2xx:
        report.problems.append(
            f"{store}: {figures.answered_2xx - figures.committed_rows} beacons answered 2xx "
            "are missing from the events table"
        )
    for name, result in (
        (f"{store} saturation", saturated),
        (f"{store} half load", at_half),
        ("bare app at the same half load", bare_half),
    ):
        if result.errors:
            report.notes.append(
                f"{name}: {result.errors:,} of {result.requests:,} answers were errors."
            )
    report.notes.append(
        f"{store}: {figures.answered_2xx:,} beacons answered 2xx in the measured runs, "
        f"{figures.committed_rows:,} rows committed (in-flight ones at wrk's stop count too)."
    )
    report.rows += [
        Row(
            f"ingest rate, {store} (wrk, {figures.connections} connections)",
            f"{_n(saturated.rate)} beacons/s (p50 {_ms(saturated.p50_ms)}, "
            f"p99 {_ms(saturated.p99_ms)}); server CPU "
            f"{figures.saturated.cpu_ms_per_request:.2f} ms/beacon",
            f"bare Flask 204: {_n(bare.load.rate)} req/s; server CPU "
            f"{bare.cpu_ms_per_request:.2f} ms/req",
            f"{ratio:.2f}",
            f"≥ {INGEST_RATIO_TARGET:.2f}",
            verdict(ratio >= INGEST_RATIO_TARGET),
        ),
        Row(
            f"ingest latency at half load, {store} (open loop, "
            f"{_n(at_half.offered_rate or 0)}/s offered, {_n(at_half.rate)}/s answered)",
            f"p99 {_ms(at_half.p99_ms)} (p50 {_ms(at_half.p50_ms)}, max {_ms(at_half.max_ms)})",
            f"bare at the same rate: p99 {_ms(bare_half.p99_ms)} (p50 {_ms(bare_half.p50_ms)})",
            "",
            f"p99 ≤ {INGEST_P99_TARGET_MS:g} ms",
            verdict(at_half.p99_ms <= INGEST_P99_TARGET_MS),
        ),
    ]


def add_relay(report: Report, figures: relay_rate.RelayFigures, store: str) -> None:
    if figures.duplicate_callbacks or figures.upstream_calls != figures.events:
        report.problems.append(
            f"relay at {figures.latency_ms:g} ms: {figures.upstream_calls:,} upstream calls for "
            f"{figures.events:,} events, {figures.duplicate_callbacks} callbacks sent twice"
        )
    targeted = figures.latency_ms == RELAY_TARGET_LATENCY_MS
    report.rows.append(
        Row(
            f"relay, one process, {store}, {figures.latency_ms:g} ms upstream "
            f"({figures.events:,} events)",
            f"{_n(figures.rate)} deliveries/s; relay CPU {figures.cpu_ms_per_event:.2f} ms/event",
            f"its Kuaishou client alone, same threads: {_n(figures.baseline_rate)} calls/s; "
            f"CPU {figures.baseline_cpu_ms_per_call:.2f} ms/call",
            f"{figures.rate / figures.baseline_rate:.2f}" if figures.baseline_rate else "",
            f"≥ {_n(RELAY_RATE_TARGET)}/s" if targeted else "",
            verdict(figures.rate >= RELAY_RATE_TARGET) if targeted else "",
        )
    )


def delivery_row(figures: delivery.DeliveryFigures) -> Row:
    return Row(
        f"beacon → upstream, `serve` on SQLite, healthy upstream ({figures.beacons} beacons "
        f"at {figures.rate:g}/s)",
        f"p50 {_ms(figures.p50_ms)}, p99 {_ms(figures.p99_ms)}, max {_ms(figures.max_ms)}",
        "",
        "",
        f"p50 ≤ {DELIVERY_P50_TARGET_MS / 1000:g} s",
        verdict(figures.p50_ms <= DELIVERY_P50_TARGET_MS),
    )


def tag_row(figures: tag_size.TagFigures, report: Report) -> Row:
    if not figures.committed_min_is_current:
        report.notes.append(
            "static/tag.min.js is not what scripts/build-tag makes from the current tag.js; "
            "the figures are the build's."
        )
    return Row(
        "tag size (static/tag.js)",
        f"{_n(figures.raw)} B raw, {_n(figures.minified)} B minified, "
        f"**{_n(figures.minified_gzipped)} B minified + gzipped**",
        f"unminified + gzipped: {_n(figures.raw_gzipped)} B",
        "",
        f"≤ {_n(TAG_GZIP_TARGET_BYTES)} B",
        verdict(figures.minified_gzipped <= TAG_GZIP_TARGET_BYTES),
    )


# ---- the report ------------------------------------------------------------------------------


def machine_lines(env: dict[str, str]) -> list[str]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    revision = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return [
        f"- machine: {os.cpu_count()} CPUs ({cpu}), {memory} memory, {platform.system()} "
        f"{platform.release()}; load generator, servers and database share it",
        f"- Python {platform.python_version()}; gunicorn {WORKERS} workers x {THREADS} threads "
        "(gthread), as `ks-collector web` runs by default; other settings shipped defaults except "
        f"{', '.join(f'{k}={v}' for k, v in env.items())}",
        f"- code: {revision or 'unknown revision'}",
    ]


def render(run: Run, seconds: float, profiled: bool, load_before: float) -> str:
    report, mode = run.report, run.mode
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# ks-collector benchmark ({mode.name} run, {when}, {seconds:.0f} s)", ""]
    lines += machine_lines(run.env)
    load_after = os.getloadavg()[0]
    lines.append(
        f"- load average (1 min) before the run: {load_before:.2f}, after: {load_after:.2f}"
        + (
            f"; **the machine was busy with other work (more than {BUSY_LOAD:g}): "
            "absolute figures are low, ratios less affected**"
            if load_before > BUSY_LOAD
            else ""
        )
    )
    if profiled:
        lines.append("- **profiled run**: py-spy sampled the processes under load")
    lines += [
        "",
        "| what | measured | baseline (same run) | ratio | target | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in report.rows:
        cells = (row.what, row.measured, row.baseline, row.ratio, row.target, row.result)
        lines.append("| " + " | ".join(cells) + " |")
    if report.problems:
        lines += ["", "**Problems (these void the figures they concern):**", ""]
        lines += [f"- {problem}" for problem in report.problems]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    lines += ["", "Method: bench/README.md. Reproduce: `python bench/run.py`."]
    return "\n".join(lines) + "\n"


# ---- the run -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py", description=__doc__.split("\n\n")[0]
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", dest="mode", const="quick")
    size.add_argument("--smoke", action="store_const", dest="mode", const="smoke")
    parser.set_defaults(mode="full")
    parser.add_argument(
        "--only",
        type=lambda text: [part.strip() for part in text.split(",")],
        default=list(PARTS),
        help=f"comma-separated parts to run (default: all of {','.join(PARTS)})",
    )
    parser.add_argument("--no-postgres", action="store_true", help="leave out PostgreSQL rows")
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KS_COLLECTOR_NAME=VALUE",
        help="a collector setting for every process of the run, to compare with the defaults",
    )
    parser.add_argument("--profile", action="store_true", help="sample with py-spy under load")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "test-output" / "bench.md",
        help="where the table goes (default: test-output/bench.md)",
    )
    args = parser.parse_args(argv)
    for setting in args.settings:
        name, sep, _value = setting.partition("=")
        if not sep or not name.startswith("KS_COLLECTOR_"):
            parser.error(f"--set takes KS_COLLECTOR_NAME=VALUE, not {setting!r}")
    unknown = set(args.only) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {PARTS}")
    return args


@dataclass
class Run:
    """One run's settings and where its files go."""

    mode: Mode
    postgres: bool
    scratch: Path  # SQLite files, deleted after the run
    log_dir: Path
    profile_dir: Path | None
    env: dict[str, str] = field(default_factory=lambda: dict(BENCH_ENV))
    report: Report = field(default_factory=Report)
    profiles: list[str] = field(default_factory=list)

    def sqlite_url(self, name: str) -> str:
        return f"sqlite:///{self.scratch / name}.db"


def run_ingest(run: Run) -> None:
    with ingest.BareBaseline(run.mode.ingest, run.log_dir) as bare:
        say("ingest: bare Flask app at saturation")
        bare_saturated = bare.saturate()
        say("ingest: collector on SQLite")
        figures, profile = ingest.measure_collector(
            "SQLite",
            run.sqlite_url("ingest"),
            bare,
            run.mode.ingest,
            run.env,
            run.log_dir,
            run.profile_dir,
        )
        add_ingest(run.report, figures, bare_saturated)
        run.profiles.append(profile)
        if run.postgres:
            say("ingest: collector on PostgreSQL")
            run_postgres_ingest(run, bare, bare_saturated)


def run_postgres_ingest(
    run: Run, bare: ingest.BareBaseline, bare_saturated: ingest.Saturated
) -> None:
    """The ingest rows on a throwaway PostgreSQL cluster (tests/support/postgres.py)."""
    from tests.support.postgres import PostgresCluster, PostgresUnavailable

    cluster = None
    try:
        cluster = PostgresCluster()
        cluster.start()
        url = cluster.create_database("ks_bench_ingest")
    except PostgresUnavailable as error:
        if cluster is not None:
            cluster.stop()
        run.report.notes.append(f"PostgreSQL rows left out: {str(error).splitlines()[0]}")
        return
    try:
        figures, profile = ingest.measure_collector(
            "PostgreSQL", url, bare, run.mode.ingest, run.env, run.log_dir, run.profile_dir
        )
    finally:
        cluster.stop()
    add_ingest(run.report, figures, bare_saturated)
    run.profiles.append(profile)


def run_relay(run: Run) -> None:
    for latency in (0.0, RELAY_TARGET_LATENCY_MS):
        say(f"relay: {run.mode.relay_events:,} events, upstream answering after {latency:g} ms")
        figures, profile = relay_rate.measure_relay(
            run.sqlite_url(f"relay-{latency:g}ms"),
            latency_ms=latency,
            events=run.mode.relay_events,
            baseline_seconds=run.mode.relay_baseline_seconds,
            env=run.env,
            log_dir=run.log_dir,
            profile_dir=run.profile_dir,
        )
        add_relay(run.report, figures, "SQLite")
        run.profiles.append(profile)


def run_delivery(run: Run) -> None:
    say("beacon → upstream latency through `ks-collector serve`")
    figures = delivery.measure_delivery(
        run.sqlite_url("delivery"),
        beacons=run.mode.beacons,
        rate=run.mode.beacon_rate,
        env=run.env,
        log_dir=run.log_dir,
    )
    run.report.rows.append(delivery_row(figures))


def run_tag(run: Run) -> None:
    say("tag size")
    run.report.rows.append(tag_row(tag_size.measure_tag(), run.report))


# Every part of a run, in the order they run.
PARTS = {"ingest": run_ingest, "relay": run_relay, "delivery": run_delivery, "tag": run_tag}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = MODES[args.mode]
    try:
        loadgen.wrk_path()
        if args.profile and profiling.py_spy() is None:
            raise loadgen.LoadError(
                f"py-spy is not installed; install it with: {profiling.PY_SPY_INSTALL_HINT}"
            )
    except loadgen.LoadError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2

    output: Path = args.output.resolve()
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ks-bench-") as scratch:
        run = Run(
            mode=mode,
            postgres=mode.postgres and not args.no_postgres,
            scratch=Path(scratch),
            log_dir=output.parent / "bench-logs",
            profile_dir=output.parent / "bench-profiles" if args.profile else None,
        )
        run.env.update(setting.split("=", 1) for setting in args.settings)
        say(f"{mode.name} run; logs in {run.log_dir}")
        for name, part in PARTS.items():
            if name in args.only:
                part(run)

    text = render(run, time.monotonic() - started, args.profile, load_before)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    print(f"written to {output}")
    if run.profile_dir is not None:
        summary = run.profile_dir / "summary.md"
        summary.write_text("\n".join(profile for profile in run.profiles if profile))
        print(f"profiles: {summary} (raw collapsed stacks beside it)")
    return 1 if run.report.problems else 0


_STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:5.1f} s]: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
