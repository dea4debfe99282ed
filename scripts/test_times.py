#!/usr/bin/env python3
"""Where a test run's time went, from the JUnit XML `make test` writes.

    .venv/bin/python scripts/test_times.py build/test-reports/junit*.xml [--top 30]

Prints markdown: the total, the time per module (setup of its fixtures included: JUnit
counts a test's setup, call and teardown together) and the slowest tests. The fixture
view (setup apart from call) is pytest's own `--durations`, printed by `make test`.
docs/benchmarks/test-time.md records these before and after a change.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def cases(files: list[Path]) -> list[tuple[str, str, float]]:
    """(module path, test name, seconds) of every test case in ``files``."""
    out = []
    for file in files:
        for case in ET.parse(file).getroot().iter("testcase"):
            module = case.get("classname", "").replace(".", "/") + ".py"
            out.append((module, case.get("name", ""), float(case.get("time", 0.0))))
    return out


def report(rows: list[tuple[str, str, float]], top: int) -> str:
    total = sum(t for _, _, t in rows)
    by_module: dict[str, float] = defaultdict(float)
    for module, _, seconds in rows:
        by_module[module] += seconds
    lines = [f"{len(rows)} tests, {total:.0f} s in tests (setup and teardown included)", ""]
    lines += ["| module | s | share |", "|---|---:|---:|"]
    for module, seconds in sorted(by_module.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {module} | {seconds:.0f} | {seconds / total:.0%} |")
    lines += ["", "| slowest tests | s |", "|---|---:|"]
    for module, name, seconds in sorted(rows, key=lambda r: -r[2])[:top]:
        lines.append(f"| {module}::{name} | {seconds:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path, nargs="+", help="JUnit XML files of one run")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.junit if not f.is_file()]
    if missing:
        print(f"error: no such JUnit file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        rows = cases(args.junit)
    except ET.ParseError as exc:
        print(f"error: not JUnit XML: {exc}", file=sys.stderr)
        return 2
    print(report(rows, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
