"""Every benchmark at its defaults, one after the other, and one table of their figures against their
anchors (each benchmark's lines that state a target), under the CPU's model and flags, so that a figure
that moves shows up before it lands:

    python bench/all.py [--models-path ~/.cache/localai-aio/models] [--only transcription embeddings ...]

A benchmark that cannot run here (a missing tool, no PostgreSQL) is listed with its last words, not
dropped. Each runs in its own process with its own server, as it does alone; wrap the whole run in
``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Quick ones first, so a broken server shows before the long runs.
BENCHMARKS = ("embeddings", "transcription", "speech", "text_generation", "constrained", "isolation", "cores",
              "concurrency", "load", "store")
TARGET = re.compile(r"\(target[^)]*?(<=|>=|<|>)\s*([\d.]+)")
NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)x?\b")


def verdict(line: str) -> str:
    """met / NOT MET for a line stating a target: its own words when it says, else its figure (the last number
    before the target) against the target's bound; "" when neither can be read."""
    lowered = line.lower()
    if "not met" in lowered:
        return "NOT MET"
    if re.search(r"\bmet\b", lowered):
        return "met"
    target = TARGET.search(line)
    figures = NUMBER.findall(line[: target.start()]) if target else []
    if not target or not figures:
        return ""
    value, bound = float(figures[-1]), float(target.group(2))
    ok = {"<=": value <= bound, ">=": value >= bound, "<": value < bound, ">": value > bound}[target.group(1)]
    return "met" if ok else "NOT MET"


def run(name: str, models_path: str | None) -> tuple[list[str], str, float]:
    """The benchmark's lines that state a target, what went wrong (if it did), and its wall time."""
    cmd = [sys.executable, str(HERE / f"{name}.py")] + (["--models-path", models_path] if models_path else [])
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    took = time.perf_counter() - start
    lines = [" ".join(line.split()) for line in done.stdout.splitlines() if "target" in line.lower()]
    problem = ""
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()[-1]
        problem = f"did not run to the end (exit {done.returncode}): {last[:200]}"
    print(f"{name}: {took:.0f} s" + (f", {problem}" if problem else ""), file=sys.stderr, flush=True)
    return lines, problem, took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", help="passed to every benchmark (each defaults to the test models)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="these benchmarks only")
    args = parser.parse_args()
    sys.path.append(str(HERE.parent / "src"))  # when the package is not installed
    import onnxruntime

    from localai_aio.backends.cpu_features import cpu_info

    cpu = cpu_info()
    rows = {name: run(name, args.models_path) for name in args.only or BENCHMARKS}
    print(f"CPU: {cpu.describe()}; vendor {cpu.vendor or 'unknown'}; int8 dot products: "
          f"{'yes' if cpu.int8_fast else 'no'}")
    print(f"flags: {' '.join(sorted(cpu.flags))}")
    print(f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| benchmark | figure against its anchor (target) | verdict |")
    print("|---|---|---|")
    for name, (lines, problem, _) in rows.items():
        for line in lines:
            print(f"| {name} | {line.replace('|', '/')} | {verdict(line)} |")
        if problem:
            print(f"| {name} | {problem.replace('|', '/')} | not measured |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
