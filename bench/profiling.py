"""Sampling profiles of the processes under load, with py-spy, summarised as top frames.

Two views per process: ``wall`` samples every thread that is not idle (where requests spend
their time, waiting on a lock or an fsync included), ``gil`` only the thread holding the GIL
(where the CPU goes in Python). py-spy reads the target's memory without stopping it
(``--nonblocking``), so the load it measures is barely disturbed; still, figures from a profiled
run are marked as such.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PY_SPY_INSTALL_HINT = "pip install py-spy"

# Samples per second; a prime, so sampling does not beat in step with periodic work.
SAMPLE_RATE = 97

# Frames every stack shares (thread start-up, and the process marker py-spy puts at the root
# of each stack with --subprocesses); they say nothing about the work.
_PLUMBING = re.compile(r"\((threading|concurrent/futures/thread)\.py:\d+\)$|^process \d+:")


# Layers a sample is counted in: the innermost frame that matches one of these decides.
LAYERS = (
    ("store (collector/store)", re.compile(r"collector/store/")),
    ("rate limits (flask_limiter, limits)", re.compile(r"flask_limiter/|limits/")),
    (
        "validation (collector/validation.py, marshmallow)",
        re.compile(r"validation\.py|marshmallow/"),
    ),
    (
        "Kuaishou client (kuaishou.py, requests, urllib3)",
        re.compile(r"kuaishou\.py|requests/|urllib3/"),
    ),
    ("metrics (prometheus_client)", re.compile(r"prometheus_client/|collector/metrics\.py")),
    ("logging", re.compile(r"logging/|collector/logs\.py")),
    ("relay loop (collector/relay.py)", re.compile(r"collector/relay\.py")),
    ("web views (collector/web)", re.compile(r"collector/web/")),
    ("Flask, werkzeug", re.compile(r"flask/|werkzeug/")),
    ("gunicorn (HTTP, sockets, worker loop)", re.compile(r"gunicorn/")),
)


@dataclass
class Recording:
    """py-spy processes recording one target; ``finish`` waits for them and summarises."""

    name: str
    outputs: dict[str, Path]
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def finish(self, top: int = 20) -> str:
        for process in self.processes:
            process.wait(timeout=120)
        sections = []
        for view, path in self.outputs.items():
            if path.is_file():
                sections.append(summarize(path, f"{self.name} ({view})", top))
            else:
                sections.append(f"## {self.name} ({view}): py-spy wrote nothing\n")
        return "\n".join(sections)


def py_spy() -> str | None:
    return shutil.which("py-spy")


def record(name: str, pid: int, seconds: float, out_dir: Path, *, subprocesses: bool) -> Recording:
    """Start sampling ``pid`` (and its children when ``subprocesses``) for ``seconds``."""
    executable = py_spy()
    if executable is None:
        raise RuntimeError(f"py-spy is not installed; install it with: {PY_SPY_INSTALL_HINT}")
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    recording = Recording(
        name, {view: out_dir / f"{slug}.{view}.collapsed" for view in ("wall", "gil")}
    )
    for view, output in recording.outputs.items():
        command = [
            executable, "record",
            "--pid", str(pid),
            "--duration", str(max(1, int(seconds))),
            "--rate", str(SAMPLE_RATE),
            "--format", "raw",
            "--output", str(output),
            "--nonblocking",
        ]  # fmt: skip
        if subprocesses:
            command.append("--subprocesses")
        if view == "gil":
            command.append("--gil")
        recording.processes.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return recording


def summarize(collapsed: Path, title: str, top: int) -> str:
    """The frames that take most samples: by line where the time is spent (self), and by
    function including what it calls (inclusive)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not _PLUMBING.search(frame)]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        layers[_layer(frames)] += count
        for function in {re.sub(r":\d+\)$", ")", frame) for frame in frames}:
            inclusive[function] += count
    if total == 0:
        return f"## {title}: no samples ({collapsed.name})\n"
    lines = [f"## {title}: {total} samples ({collapsed.name})", "", "by layer:"]
    lines += [f"  {count / total:6.1%}  {layer}" for layer, count in layers.most_common()]
    lines += ["", "self (by line):"]
    lines += [f"  {count / total:6.1%}  {frame}" for frame, count in own.most_common(top)]
    lines += ["", "inclusive (by function):"]
    lines += [f"  {count / total:6.1%}  {frame}" for frame, count in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in LAYERS:
            if pattern.search(frame):
                return name
    return "other (interpreter, threads, selectors)"
