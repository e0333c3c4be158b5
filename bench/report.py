"""Make docs/performance.md's table of latest figures from bench/results/*.json (bench/results.py).

One row per result file: what is measured, the target, the latest figure with its date and
machine, and the command that measures it again. The table replaces what stands between the
page's two marker lines; the rest of the page is prose kept by hand. `--check` changes nothing
and exits 1 when the page's table is not the one the result files make.

    .venv/bin/python bench/report.py [--check]      (make bench-report)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from results import RESULTS

PAGE = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN = "<!-- latest figures: made by bench/report.py from bench/results/*.json; edit those, not this table -->"
END = "<!-- end of the latest figures -->"
ORDER = (
    "fast_path",
    "fast_path_3_classes",
    "burst",
    "burst_3_classes",
    "burst_queue",
    "state_size",
    "probes",
    "reconcile_scale",
    "cloud",
    "job_start",
    "simulate",
)


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def when(result: dict[str, Any]) -> str:
    machine = result.get("machine", {})
    facts = [
        f"{machine['nproc']} cores" if machine.get("nproc") else "",
        f"load {machine['load']}" if machine.get("load") is not None else "",
    ]
    seed = " (seed: that day's figure copied by hand, not written by the bench)" if result.get("seed") else ""
    return f"{result['when'][:10]}, {', '.join(fact for fact in facts if fact)}{seed}"


def verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "—"}[met]


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| benchmark | what | target | latest figure | when | command |", "| --- | --- | --- | --- | --- | --- |"]
    for result in results:
        rows.append(
            "| "
            + " | ".join(
                cell(text)
                for text in (
                    f"`{result['name']}`",
                    result["what"],
                    f"{result['target']}: {verdict(result['met'])}",
                    result["figure"],
                    when(result),
                    f"`{result['command']}`",
                )
            )
            + " |"
        )
    return "\n".join(rows)


def load() -> list[dict[str, Any]]:
    results = [json.loads(path.read_text()) for path in RESULTS.glob("*.json")]
    rank = {name: index for index, name in enumerate(ORDER)}
    return sorted(results, key=lambda result: (rank.get(result["name"], len(ORDER)), result["name"]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="exit 1 if the page's table is out of date")
    args = parser.parse_args()
    page = PAGE.read_text()
    if BEGIN not in page or END not in page:
        print(f"{PAGE}: the marker lines of the figures' table are missing; put them back", file=sys.stderr)
        return 1
    before, rest = page.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    results = load()
    made = f"{before}{BEGIN}\n{table(results)}\n{END}{after}"
    if args.check:
        if made != page:
            print(f"{PAGE}: its table is not made from bench/results/ yet: run make bench-report", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(made)
    print(f"{PAGE.relative_to(PAGE.parents[1])}: table made from {len(results)} result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
