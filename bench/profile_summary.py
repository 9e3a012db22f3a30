"""Summarize py-spy raw (collapsed) stacks: where the sampled CPU time goes.

    .venv/bin/python bench/profile_summary.py bench/out/profile/*.txt

For each file: the total samples, the functions of service/ and worker/ by
inclusive share, and the leaf functions (self time) of any module.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame(raw: str) -> tuple[str, str]:
    m = FRAME.match(raw.strip())
    if not m:
        return raw.strip(), ""
    return m.group("name"), m.group("path")


def summarize(path: Path, top: int = 25) -> dict:
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames and frames[0].startswith("process "):
            processes[frames[0][:80]] += n
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("thread ")]
        seen = set()
        for raw in frames:
            name, where = _frame(raw)
            key = f"{where.removesuffix('.py')}:{name}" if where else name
            if key not in seen and ("service/" in where or "worker/" in where):
                inclusive[key] += n
                seen.add(key)
        if frames:
            name, where = _frame(frames[-1])
            leaf[f"{where}:{name}"] += n
    pct = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "processes": {k: pct(v) for k, v in processes.most_common(8)},
        "inclusive_pct": {k: pct(v) for k, v in inclusive.most_common(top)},
        "self_pct": {k: pct(v) for k, v in leaf.most_common(top)},
    }


def main() -> None:
    for arg in sys.argv[1:]:
        s = summarize(Path(arg))
        print(f"== {arg}: {s['samples']} samples")
        for title in ("processes", "inclusive_pct", "self_pct"):
            print(f"  -- {title}")
            for k, v in s[title].items():
                print(f"    {v:5.1f}%  {k}")


if __name__ == "__main__":
    main()
