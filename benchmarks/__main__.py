"""Run every benchmark module in one process and print one report.

Each ``benchmarks/bench_*.py`` exposes ``async def run(quick: bool) -> tuple[str, dict]``
returning a markdown table and JSON-able figures. Results go to ``benchmarks/results/``:
``latest.{md,json,png}`` for a full run, ``partial.*`` (not kept in git) for a run of some
benchmarks or a ``--quick`` one.
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
    # A run of some benchmarks only (or --quick) leaves the full run's results as they are.
    stem = "latest" if not args.names and not args.quick else "partial"
    (out_dir / f"{stem}.md").write_text("\n\n".join(report) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    chart(figures, out_dir / f"{stem}.png")


def _ratios(data: object, prefix: str = "") -> list[tuple[str, float]]:
    """Every ``{"ratio": x}`` entry in a benchmark's figures, with a readable label."""
    found: list[tuple[str, float]] = []
    if isinstance(data, dict):
        ratio = data.get("ratio")
        if isinstance(ratio, (int, float)) and prefix:
            found.append((prefix, float(ratio)))
        for key, value in data.items():
            if isinstance(value, dict):
                found.extend(_ratios(value, f"{prefix} / {key}" if prefix else str(key)))
    return found


def chart(figures: dict[str, object], path: Path) -> None:
    """A bar chart of every ratio (1.0 = the benchmark's anchor), one panel per benchmark."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra is not installed
        print("matplotlib is not installed: no chart")
        return
    panels = [(name, _ratios(data)) for name, data in figures.items()]
    panels = [(name, rows) for name, rows in panels if rows]
    if not panels:
        return
    height = sum(max(1.5, 0.32 * len(rows) + 0.8) for _, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, height), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels, strict=True):
        labels = [label for label, _ in rows]
        values = [value for _, value in rows]
        ax.barh(labels, values, color=["#4c72b0" if v <= 1.0 else "#dd8452" for v in values])
        ax.axvline(1.0, color="black", linewidth=0.8)
        higher = "median_rps" in json.dumps(figures[name], default=str)
        note = " (requests/s: higher is better)" if higher else " (time: lower is cheaper)"
        ax.set_title(name.removeprefix("bench_") + note, loc="left", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.suptitle("aimiddleware benchmarks: ratio to each benchmark's anchor (1.0)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
