"""Run every benchmark module in one process and print one report.

Each ``benchmarks/bench_*.py`` exposes ``async def run(quick: bool) -> tuple[str, dict]``
returning a markdown table and JSON-able figures. Results go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import pkgutil
import platform
from pathlib import Path

import benchmarks


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("names", nargs="*", help="run only these (e.g. context ratelimit)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    args = parser.parse_args()
    found = pkgutil.iter_modules(benchmarks.__path__)
    mods = sorted(m.name for m in found if m.name.startswith("bench_"))
    if args.names:
        mods = [m for m in mods if m.removeprefix("bench_") in args.names]
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    report = [
        f"Machine: {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.system()}"
    ]
    figures: dict[str, object] = {}
    for name in mods:
        mod = importlib.import_module(f"benchmarks.{name}")
        text, data = asyncio.run(mod.run(args.quick))
        print(text, "\n", flush=True)
        report.append(text)
        figures[name] = data
    (out_dir / "latest.md").write_text("\n\n".join(report) + "\n")
    (out_dir / "latest.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
