"""Benchmark results as files: each bench writes bench/results/<name>.json as it ends, besides
printing its figures, and bench/report.py makes docs/performance.md's table from those files.

A result is one row of that table: what was measured, its target, the figure (the words a reader
reads, e.g. "0.51x (7.2 vs 14.0 s)") and its number, whether the target was met, when, on what
machine (cores, load), and the command that measures it again.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the figure depends on besides the code: cores, load, CPU model, kernel, Python."""
    cpu = ""
    try:
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "load": round(os.getloadavg()[0], 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def record(
    name: str,
    *,
    what: str,
    target: str,
    figure: str,
    met: bool | None,
    value: float | None = None,
    unit: str = "",
    command: str | None = None,
    details: dict[str, Any] | None = None,
) -> Path:
    """Write bench/results/<name>.json (replacing the last one) and return its path. The command
    that measures it again is `make bench-<name>` unless another is given."""
    result = {
        "name": name,
        "what": what,
        "target": target,
        "figure": figure,
        "value": value,
        "unit": unit,
        "met": met,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command or f"make bench-{name}",
        "machine": machine(),
        "details": details or {},
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=1) + "\n")
    temporary.replace(path)
    print(f"  result written to {path.relative_to(RESULTS.parent.parent)}")
    return path
