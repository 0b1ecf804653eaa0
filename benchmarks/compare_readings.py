"""Which readings of an ablation table change between two versions of it (issue 39).

A *reading* is what a difference column says: above, below, or `tie` (its 95% interval holds
0). Given the `results.md` of a table before and after a change of rules (the same rows, rerun),
this prints, for each row in both, its compute (steps / examples seen) before and after and
every difference column whose reading is not the same:

    python benchmarks/compare_readings.py BEFORE.md AFTER.md [--all]

`--all` lists the readings that did not change too. The columns compared are those both
tables have: `Δ overall vs ...`, `Δm% vs single-task` and each task's `... vs alone (points)`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

COMPUTE = "Steps / examples seen"
FLAG = re.compile(r"\s*⚠.*$")  # a row's no-op flag follows its name
NUMBER = re.compile(r"[-+−]?\d+(?:\.\d+)?")


def tables(text: str) -> dict[tuple[str, str], str]:
    """Every cell of the first ablation table of `text` (its main table and its per-task one,
    up to a table whose header repeats one seen: a second ablation in the same file), rows
    named in the first column: (row, column header) -> cell text."""
    cells: dict[tuple[str, str], str] = {}
    header: list[str] | None = None
    seen: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None
            continue
        parts = [p.strip() for p in line.strip("|").split("|")]
        if header is None:
            if parts in seen:
                break
            header = parts
            seen.append(header)
        elif not set(line) <= set("|-: "):
            row = FLAG.sub("", parts[0])
            cells.update({(row, column): cell for column, cell in zip(header[1:], parts[1:])})
    return cells


def reading(cell: str) -> str:
    """`tie`, `above` or `below` (the sign of the mean), or the cell as it is (`–`)."""
    if cell.endswith("tie"):
        return "tie"
    match = NUMBER.search(cell)
    if match is None:
        return cell
    return "above" if float(match.group().replace("−", "-")) > 0 else "below"


def is_difference(column: str) -> bool:
    return column.startswith(("Δ overall vs", "Δm% vs")) or column.endswith("vs alone (points)")


def compare(before: str, after: str, everything: bool = False) -> str:
    old, new = tables(before), tables(after)
    old_rows = {row for row, _ in old}
    rows = list(dict.fromkeys(row for row, _ in new if row in old_rows))
    lines = ["| Row | Steps / examples seen, before | After |", "|---|---:|---:|"]
    lines += [f"| {row} | {old.get((row, COMPUTE), '–')} | {new.get((row, COMPUTE), '–')} |"
              for row in rows]
    lines += ["", "| Row | Column | Before | After | Reading |", "|---|---|---:|---:|---|"]
    changed = 0
    for (row, column), cell in new.items():
        if (row, column) not in old or not is_difference(column):
            continue
        was, now = reading(old[row, column]), reading(cell)
        changed += was != now
        if was != now or everything:
            verdict = "same" if was == now else f"{was} → {now}"
            lines.append(f"| {row} | {column} | {old[row, column]} | {cell} | {verdict} |")
    lines += ["", f"{changed} reading(s) changed over {len(rows)} rows in both tables."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--all", action="store_true", help="list unchanged readings too")
    args = parser.parse_args(argv)
    print(compare(args.before.read_text(encoding="utf-8"),
                  args.after.read_text(encoding="utf-8"), args.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
