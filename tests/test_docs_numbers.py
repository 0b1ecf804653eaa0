"""The readings in the results docs quote their tables (issue 39).

A *reading* is a number that states a measured difference or ratio: a signed decimal
(`+0.027`, `-53.7`, `-4.01%`, an interval's ends) or a decimal ratio (`4.69x`). Quoted in the
prose of a file, it must be a number of a table of the same file (a markdown table, or an
indented block of 4 spaces or more: a command's printed output), possibly rounded to fewer
decimals (`-5.8` for a cell's `-5.79`). The README's prose summarises the results files it
links, so it may quote their tables too.

Not prose, hence not checked: tables, fenced code blocks, inline code, HTML comments (each
table's command and provenance) and link targets. Unsigned numbers (budgets, step counts,
seeds, dates, scores restated from a table) are not readings.
"""

import re
from decimal import Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted((REPO / "docs" / "results").glob("*.md"))
README, BENCHMARKS = REPO / "README.md", REPO / "benchmarks" / "README.md"
READING = re.compile(r"(?<![\w.])(?:([-+−]\d+\.\d+)|(\d+\.\d+)x)(?![\w.]*\d)")
TABLE_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+\.\d+")


def tables_and_prose(text: str) -> tuple[str, list[str]]:
    text = re.sub(r"<!--.*?-->|```.*?```", " ", text, flags=re.S)
    tables, prose = [], []
    for line in text.splitlines():
        if line.lstrip().startswith("|") or line.startswith("    "):
            tables.append(line)
        else:
            prose.append(re.sub(r"\]\([^)]*\)", "]", re.sub(r"`[^`]*`", " ", line)))
    return "\n".join(tables), prose


def numbers(text: str) -> set[Decimal]:
    return {Decimal(n.replace("−", "-").lstrip("+")) for n in TABLE_NUMBER.findall(text)}


def unquoted_readings(text: str, other_tables: str = "") -> list[str]:
    """The readings in `text`'s prose that no table of it (or `other_tables`) holds."""
    tables, prose = tables_and_prose(text)
    cells = numbers(tables + "\n" + other_tables)
    missing = []
    for line in prose:
        for signed, ratio in READING.findall(line):
            quoted = Decimal((signed or ratio).replace("−", "-").lstrip("+"))
            places = quoted.as_tuple().exponent
            if not any(cell.quantize(Decimal(1).scaleb(places)) == quoted for cell in cells):
                missing.append(f"{signed or ratio + 'x'}: {line.strip()}")
    return missing


def test_a_reading_absent_from_its_table_fails_and_a_rounded_one_passes():
    text = ("| row | Δ |\n|---|---:|\n| pals | +0.027 [+0.006, +0.048] | 4.69x |\n\n"
            "PALs gain +0.027 [+0.006, +0.048] (+0.03 rounded), 4.69x the speed, with `lr 5e-5`"
            " and 600 steps.\n<!-- mtbert ablate --seeds 3 (+1.5x) -->\n")
    assert unquoted_readings(text) == []
    stale = text.replace("4.69x the speed", "4.87x the speed").replace("(+0.03", "(+0.031")
    assert [m.split(":")[0] for m in unquoted_readings(stale)] == ["+0.031", "4.87x"]


@pytest.mark.parametrize("path", [*RESULTS, BENCHMARKS], ids=lambda p: p.name)
def test_every_reading_in_a_results_file_is_in_its_tables(path):
    assert unquoted_readings(path.read_text(encoding="utf-8")) == []


def test_every_reading_in_the_readme_is_in_a_table_it_links():
    linked = "\n".join(tables_and_prose(p.read_text(encoding="utf-8"))[0]
                       for p in [*RESULTS, BENCHMARKS])
    assert unquoted_readings(README.read_text(encoding="utf-8"), linked) == []
