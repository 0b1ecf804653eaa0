"""Tests for mtbert.data.readers: the real task files, broken files, and random input.

The real files come from the ``data_dir`` fixture (../shared/data; skipped when absent).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtbert.data.readers import DataError, Example, ReadReport, read_examples, stream_examples

SINGLE = ["sentence"]
PAIR = ["sentence1", "sentence2"]
QUORA_DEV_MALFORMED_LINES = [2577, 14222]

# file, text columns, label column, label constraints, rows in the README table
REAL_FILES = [
    ("ids-sst-train.csv", SINGLE, "sentiment", {"num_classes": 5}, 8544),
    ("ids-sst-dev.csv", SINGLE, "sentiment", {"num_classes": 5}, 1101),
    ("ids-sst-test-student.csv", SINGLE, None, {}, 2210),
    ("ids-cfimdb-train.csv", SINGLE, "sentiment", {"num_classes": 2}, 1707),
    ("ids-cfimdb-dev.csv", SINGLE, "sentiment", {"num_classes": 2}, 245),
    ("ids-cfimdb-test-student.csv", SINGLE, None, {}, 488),
    ("quora-train.csv", PAIR, "is_duplicate", {"num_classes": 2}, 11000),
    ("quora-dev.csv", PAIR, "is_duplicate", {"num_classes": 2}, 20214),
    ("sts-train.csv", PAIR, "similarity", {"label_range": (0.0, 5.0)}, 6040),
    ("sts-dev.csv", PAIR, "similarity", {"label_range": (0.0, 5.0)}, 863),
    ("sts-test-student.csv", PAIR, None, {}, 1725),
]


def read_quora_dev(data_dir: Path, **options) -> ReadReport:
    return read_examples(data_dir / "quora-dev.csv", PAIR, "is_duplicate", num_classes=2, **options)


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def read_sentiment(path: Path, **options) -> ReadReport:
    return read_examples(path, SINGLE, "sentiment", num_classes=5, **options)


SENTIMENT_HEADER = "\tid\tsentence\tsentiment\n"


# --- the real task files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text_columns", "label_column", "constraints", "rows"),
    REAL_FILES,
    ids=[entry[0] for entry in REAL_FILES],
)
def test_real_file_row_counts_and_labels(
    data_dir, name, text_columns, label_column, constraints, rows
):
    report = read_examples(data_dir / name, text_columns, label_column, **constraints)

    assert len(report.examples) + len(report.skipped) == rows
    expected_skips = len(QUORA_DEV_MALFORMED_LINES) if name == "quora-dev.csv" else 0
    assert len(report.skipped) == expected_skips
    assert len({example.id for example in report.examples}) == len(report.examples)
    assert all(len(example.texts) == len(text_columns) for example in report.examples)
    assert all(text and text == text.strip() for ex in report.examples for text in ex.texts)
    if label_column is None:
        assert all(example.label is None for example in report.examples)


def test_sst_labels_are_the_five_classes(data_dir):
    report = read_examples(data_dir / "ids-sst-train.csv", SINGLE, "sentiment", num_classes=5)
    assert {example.label for example in report.examples} == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_sts_labels_lie_in_zero_to_five(data_dir):
    report = read_examples(data_dir / "sts-train.csv", PAIR, "similarity")
    labels = [example.label for example in report.examples]
    assert min(labels) == 0.0
    assert max(labels) == 5.0


def test_sst_test_file_with_extra_leading_column_is_read_by_header_name(data_dir):
    report = read_examples(data_dir / "ids-sst-test-student.csv", SINGLE, None)
    assert report.examples[0] == Example(
        id="b7573736a6ddf7be102b7fee0", texts=("Effective but too-tepid biopic",), label=None
    )


def test_quora_dev_skips_exactly_the_two_malformed_rows(data_dir, caplog):
    with caplog.at_level(logging.INFO, logger="mtbert.data.readers"):
        report = read_quora_dev(data_dir)

    assert len(report.examples) == 20212
    assert [line for line, _ in report.skipped] == QUORA_DEV_MALFORMED_LINES
    messages = [record.getMessage() for record in caplog.records]
    for line in QUORA_DEV_MALFORMED_LINES:
        assert any(f"quora-dev.csv:{line}: skipped row" in message for message in messages)
    assert any(
        "quora-dev.csv: read 20212 examples, skipped 2 malformed rows" in message
        for message in messages
    )


def test_quora_dev_strict_raises_naming_file_and_line(data_dir):
    with pytest.raises(DataError, match=r"quora-dev\.csv:2577: malformed row"):
        read_quora_dev(data_dir, strict=True)


# --- files that cannot be used ---------------------------------------------------------


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match=r"absent\.csv: file not found"):
        read_sentiment(tmp_path / "absent.csv")


def test_directory_raises(tmp_path):
    with pytest.raises(DataError, match="cannot open"):
        read_sentiment(tmp_path)


@pytest.mark.parametrize(
    "content", [b"", b"\xef\xbb\xbf", b"\n\r\n"], ids=["empty", "bom", "blank"]
)
def test_empty_file_raises(tmp_path, content):
    with pytest.raises(DataError, match=r"empty\.tsv: file is empty"):
        read_sentiment(write(tmp_path, "empty.tsv", content))


def test_header_only_raises(tmp_path):
    with pytest.raises(DataError, match=r"header\.tsv: no data rows"):
        read_sentiment(write(tmp_path, "header.tsv", SENTIMENT_HEADER))


def test_header_lacking_a_column_names_it_and_the_columns_found(tmp_path):
    path = write(tmp_path, "wrong.tsv", "\tid\ttext\tsentiment\n0\ta\tfine\t1\n")
    with pytest.raises(DataError) as raised:
        read_sentiment(path)
    message = str(raised.value)
    assert "wrong.tsv" in message
    assert "lacks column(s) 'sentence'" in message
    assert "['', 'id', 'text', 'sentiment']" in message


def test_repeated_required_column_raises(tmp_path):
    path = write(tmp_path, "twice.tsv", "id\tsentence\tsentence\tsentiment\na\tx\ty\t1\n")
    with pytest.raises(DataError, match="repeats column"):
        read_sentiment(path)


@pytest.mark.parametrize("label", ["5", "-1", "2.5"])
def test_class_label_out_of_range_raises_even_when_not_strict(tmp_path, label):
    path = write(tmp_path, "labels.tsv", f"{SENTIMENT_HEADER}0\ta\tfine\t1\n1\tb\tbad\t{label}\n")
    with pytest.raises(DataError, match=r"labels\.tsv:3: label .* is not a class in 0\.\.4"):
        read_sentiment(path)


def test_regression_label_out_of_range_raises(tmp_path):
    path = write(tmp_path, "sts.tsv", "id\tsentence1\tsentence2\tsimilarity\na\tx\ty\t5.5\n")
    with pytest.raises(DataError, match=r"sts\.tsv:2: label 5\.5 is outside \[0, 5\]"):
        read_examples(path, PAIR, "similarity", label_range=(0.0, 5.0))


def test_bad_arguments_raise_value_error(tmp_path):
    path = write(tmp_path, "ok.tsv", f"{SENTIMENT_HEADER}0\ta\tfine\t1\n")
    with pytest.raises(ValueError, match="not a str"):
        read_examples(path, "sentence", "sentiment")
    with pytest.raises(ValueError, match="file_format"):
        read_examples(path, SINGLE, "sentiment", file_format="xml")
    with pytest.raises(ValueError, match="label_range"):
        read_examples(path, SINGLE, "sentiment", label_range=(5.0, 0.0))


# --- rows that are skipped and contents that still read --------------------------------


def test_malformed_rows_are_skipped_with_their_line_numbers(tmp_path, caplog):
    rows = [
        "0\ta\tgood one\t3.0",
        "1\tb\tgarbage label\tpositive",
        "2\tc\tempty label\t",
        "3\td",
        "4\te\t   \t2",
        "5\tf\tnot finite\tnan",
        "6\tg\tgood two\t0",
    ]
    path = write(tmp_path, "mixed.tsv", SENTIMENT_HEADER + "\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING, logger="mtbert.data.readers"):
        report = read_sentiment(path)

    assert report.examples == [
        Example("a", ("good one",), 3.0),
        Example("g", ("good two",), 0.0),
    ]
    assert report.skipped == [
        (3, "'sentiment' value 'positive' is not a number"),
        (4, "empty 'sentiment'"),
        (5, "row has 2 fields, needs at least 4"),
        (6, "empty 'sentence'"),
        (7, "'sentiment' value 'nan' is not finite"),
    ]
    assert f"{path}:3: skipped row: 'sentiment' value 'positive'" in caplog.text
    assert f"{path}: read 2 examples, skipped 5 malformed rows" in caplog.text


def test_strict_raises_on_the_first_malformed_row(tmp_path):
    path = write(tmp_path, "strict.tsv", f"{SENTIMENT_HEADER}0\ta\tok\t1\n1\tb\t\t1\n2\tc\t\t1\n")
    with pytest.raises(DataError, match=r"strict\.tsv:3: malformed row: empty 'sentence'"):
        read_sentiment(path, strict=True)


def test_individual_skip_warnings_are_capped(tmp_path, caplog):
    bad_rows = "".join(f"{index}\tid{index}\ttext\t\n" for index in range(25))
    path = write(tmp_path, "many.tsv", SENTIMENT_HEADER + bad_rows + "25\tok\ttext\t1\n")
    with caplog.at_level(logging.WARNING, logger="mtbert.data.readers"):
        report = read_sentiment(path)

    assert len(report.skipped) == 25
    assert caplog.text.count("skipped row:") == 20
    assert "5 more malformed rows skipped, not logged individually" in caplog.text
    assert "read 1 examples, skipped 25 malformed rows" in caplog.text


def test_crlf_reads_the_same_as_lf(tmp_path):
    rows = f"{SENTIMENT_HEADER}0\ta\tone\t1\n1\tb\ttwo\t\n2\tc\tthree\t3\n"
    lf = read_sentiment(write(tmp_path, "lf.tsv", rows))
    crlf = read_sentiment(write(tmp_path, "crlf.tsv", rows.replace("\n", "\r\n")))
    assert (crlf.examples, crlf.skipped) == (lf.examples, lf.skipped)
    assert len(crlf.examples) == 2


def test_a_stray_quote_skips_its_own_line_only(tmp_path):
    """Issue 21, defect 1: a sentence opening with `"` that never closes used to make the CSV
    parser read the rest of the file as one field (4 of 200 rows kept, exit 0)."""
    rows = [f"{i}\tid{i}\tsentence {i}\t{i % 5}" for i in range(200)]
    rows[4] = '4\tid4\t"an opening quote that never closes\t4'
    report = read_sentiment(write(tmp_path, "stray.tsv", SENTIMENT_HEADER + "\n".join(rows)))
    assert len(report.examples) == 199
    assert [line for line, _ in report.skipped] == [6]
    assert "quoting" in report.skipped[0][1]
    assert report.examples[-1] == Example("id199", ("sentence 199",), 4.0)


def test_a_quoted_field_does_not_run_across_lines(tmp_path):
    rows = SENTIMENT_HEADER + '0\ta\t"spans\nthree\nlines"\t1\n1\tb\tbad\tx\n2\tc\tok\t2\n'
    report = read_sentiment(write(tmp_path, "span.tsv", rows))
    assert report.examples == [Example("c", ("ok",), 2.0)]
    assert [line for line, _ in report.skipped] == [2, 3, 4, 5]


def test_quotes_that_close_on_their_line_are_csv_quoting(tmp_path):
    rows = SENTIMENT_HEADER + '0\ta\t"""Why ""this""?"""\t1\n'
    assert read_sentiment(write(tmp_path, "q.tsv", rows)).examples == [
        Example("a", ('"Why "this"?"',), 1.0)]


def test_too_many_malformed_rows_is_an_error(tmp_path):
    rows = SENTIMENT_HEADER + "".join(f"{i}\t{i}\ttext\t{'x' if i < 3 else 1}\n"
                                      for i in range(20))
    path = write(tmp_path, "bad.tsv", rows)
    assert len(read_sentiment(path, max_skipped_share=0.2).skipped) == 3
    with pytest.raises(DataError, match=r"bad.tsv: 3 of 20 rows are malformed .*line 2"):
        read_sentiment(path, max_skipped_share=0.1)


def test_a_stream_checks_the_share_after_its_last_row_and_lists_a_bounded_few(tmp_path):
    """A stream holds no list of its rows: it yields every example before the share limit can
    be judged, and a report with `listed` keeps that many skipped rows, counting the rest."""
    rows = SENTIMENT_HEADER + "".join(f"{i}\t{i}\ttext\t{'x' if i % 2 else 1}\n"
                                      for i in range(20))
    path = write(tmp_path, "half.tsv", rows)
    report = ReadReport(path, [], [], listed=3)
    stream = stream_examples(path, SINGLE, "sentiment", num_classes=5, report=report,
                             max_skipped_share=0.4)
    examples = [next(stream) for _ in range(10)]  # all of them, as they come
    assert [e.id for e in examples] == [str(i) for i in range(0, 20, 2)]
    with pytest.raises(DataError, match=r"half.tsv: 10 of 20 rows are malformed .*line 3"):
        next(stream)
    reason = "'sentiment' value 'x' is not a number"
    assert report.skipped == [(3, reason), (5, reason), (7, reason)]
    assert report.skipped_count == 10


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_utf16_is_an_error_not_text_with_nuls_dropped(tmp_path, encoding):
    path = tmp_path / "wide.tsv"
    path.write_text(SENTIMENT_HEADER + "0\ta\tfine\t1\n", encoding=encoding)
    with pytest.raises(DataError, match="wide.tsv: looks UTF-16 encoded"):
        read_sentiment(path)


def test_byte_order_mark_is_ignored(tmp_path):
    path = write(tmp_path, "bom.tsv", b"\xef\xbb\xbfid\tsentence\tsentiment\na\tfine\t1\n")
    assert read_sentiment(path).examples == [Example("a", ("fine",), 1.0)]


def test_nul_bytes_are_dropped(tmp_path):
    path = write(tmp_path, "nul.tsv", f"{SENTIMENT_HEADER}0\ta\tfi\0ne\t1\n1\tb\t\0\t2\n")
    report = read_sentiment(path)
    assert report.examples == [Example("a", ("fine",), 1.0)]
    assert report.skipped == [(3, "empty 'sentence'")]


def test_invalid_utf8_in_a_needed_field_skips_only_that_row(tmp_path):
    content = (
        SENTIMENT_HEADER.encode()
        + b"0\ta\tbad \xff\xfe byte\t1\n"
        + b"\xc3(\tb\tindex column may be broken\t2\n"
        + "2\tc\tcaf\u00e9\t3\n".encode()
    )
    report = read_sentiment(write(tmp_path, "bytes.tsv", content))
    assert report.examples == [
        Example("b", ("index column may be broken",), 2.0),
        Example("c", ("caf\u00e9",), 3.0),
    ]
    assert report.skipped == [(2, "'sentence' holds bytes that are not valid UTF-8")]


def test_one_megabyte_field_is_read(tmp_path):
    text = "word " * 200_000 + "end"
    report = read_sentiment(write(tmp_path, "big.tsv", f"{SENTIMENT_HEADER}0\ta\t{text}\t4\n"))
    assert report.examples == [Example("a", (text,), 4.0)]


def test_file_without_id_column_uses_row_index(tmp_path):
    path = write(tmp_path, "noid.tsv", "sentence\tsentiment\nfirst\t1\n\tbroken\nthird\t2\n")
    report = read_sentiment(path)
    assert [example.id for example in report.examples] == ["0", "2"]


def test_unlabelled_read_ignores_an_absent_label_column(tmp_path):
    path = write(tmp_path, "test.tsv", "0\t\tid\tsentence\n1\t0.0\ta\t first \n")
    report = read_examples(path, SINGLE, None)
    assert report.examples == [Example("a", ("first",), None)]


def test_comma_csv_with_quoted_commas_is_sniffed(tmp_path):
    content = 'id,sentence1,sentence2,is_duplicate\nq1,"Hi, there","He said ""no"", twice",1\n'
    report = read_examples(write(tmp_path, "pairs.csv", content), PAIR, "is_duplicate")
    assert report.examples == [Example("q1", ("Hi, there", 'He said "no", twice'), 1.0)]


def test_explicit_format_overrides_sniffing(tmp_path):
    path = write(tmp_path, "data.txt", "id,sentence,sentiment\na,x\ty,1\n")
    report = read_sentiment(path, file_format="csv")
    assert report.examples == [Example("a", ("x\ty",), 1.0)]


def test_jsonl_reads_good_lines_and_skips_bad_ones(tmp_path):
    lines = [
        json.dumps({"id": "a", "sentence": " good ", "sentiment": 2}),
        "",
        "not json",
        "[1, 2]",
        json.dumps({"id": "c", "sentiment": 1}),
        json.dumps({"id": "d", "sentence": "flag", "sentiment": True}),
        json.dumps({"id": 7, "sentence": "numeric id", "sentiment": "4.0"}),
        json.dumps({"sentence": "no id", "sentiment": 0}),
    ]
    path = write(tmp_path, "rows.jsonl", "\r\n".join(lines) + "\n")
    report = read_sentiment(path)
    assert report.examples == [
        Example("a", ("good",), 2.0),
        Example("7", ("numeric id",), 4.0),
        Example("6", ("no id",), 0.0),
    ]
    assert report.skipped == [
        (3, "line is not valid JSON"),
        (4, "line is not a JSON object"),
        (5, "missing 'sentence'"),
        (6, "'sentiment' value True is not a number"),
    ]


def test_jsonl_label_out_of_range_raises(tmp_path):
    path = write(tmp_path, "rows.json", json.dumps({"id": "a", "sentence": "x", "sentiment": 9}))
    with pytest.raises(DataError, match=r"rows\.json:1: label 9 is not a class"):
        read_sentiment(path)


# --- property-based tests --------------------------------------------------------------

NASTY_BYTES = [b"\t", b",", b'"', b"\n", b"\r", b"\0", b"\xff", b"\xc3", b"{", b"}", b":", b" "]
FILE_BYTES = st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from([*NASTY_BYTES, b"id", b"sentence", b"sentiment", b"1", b"x"])).map(
        b"".join
    ),
    st.binary(max_size=400).map(lambda tail: SENTIMENT_HEADER.encode() + tail),
)


@settings(max_examples=200, deadline=None)
@given(
    content=FILE_BYTES,
    file_format=st.sampled_from([None, "tsv", "csv", "jsonl"]),
    strict=st.booleans(),
)
def test_any_bytes_read_or_raise_data_error(tmp_path_factory, content, file_format, strict):
    path = tmp_path_factory.getbasetemp() / "random.csv"
    path.write_bytes(content)
    try:
        report = read_sentiment(path, file_format=file_format, strict=strict)
    except DataError:
        return
    assert isinstance(report, ReadReport)


# Text the TSV writer may put in a field unquoted: no tab, line break, quote or NUL.
FIELD_TEXT = st.text(
    alphabet=st.characters(exclude_characters='\t\n\r"\0', exclude_categories=["Cs"]),
    min_size=1,
    max_size=30,
).filter(lambda text: text.strip())
IDENTIFIER = st.text(alphabet="abcdef0123456789", min_size=1, max_size=12)
SIMILARITY = st.floats(min_value=0.0, max_value=5.0)
PAIR_HEADER = "\tid\tsentence1\tsentence2\tsimilarity\n"


@st.composite
def malformed_rows(draw, index: int) -> str:
    """A row in pair-task layout that the reader must skip."""
    first, second = draw(FIELD_TEXT), draw(FIELD_TEXT)
    label = repr(draw(SIMILARITY))
    fields = [str(index), draw(IDENTIFIER), first, second]
    kind = draw(st.sampled_from(["empty label", "garbage label", "missing fields", "quote"]))
    if kind == "empty label":
        return "\t".join([*fields, ""])
    if kind == "garbage label":
        return "\t".join([*fields, "x" + draw(IDENTIFIER)])
    if kind == "missing fields":
        return "\t".join(fields[: draw(st.integers(min_value=1, max_value=3))])
    # A quote opening a field and closing on the same line swallows the next tab.
    return "\t".join([*fields[:2], f'"{first}\t{second}"', label])


@st.composite
def pair_files(draw) -> tuple[str, list[tuple[int, Example]], list[int]]:
    """A TSV of good and malformed rows, the good examples with lines, and the bad lines."""
    good: list[tuple[int, Example]] = []
    bad_lines: list[int] = []
    rows: list[str] = []
    for index in range(draw(st.integers(min_value=1, max_value=30))):
        line = index + 2
        if draw(st.booleans()):
            bad_lines.append(line)
            rows.append(draw(malformed_rows(index)))
            continue
        example_id, first, second = draw(IDENTIFIER), draw(FIELD_TEXT), draw(FIELD_TEXT)
        label = draw(SIMILARITY)
        rows.append("\t".join([str(index), example_id, first, second, repr(label)]))
        good.append((line, Example(example_id, (first.strip(), second.strip()), label)))
    return PAIR_HEADER + "\n".join(rows) + "\n", good, bad_lines


@settings(max_examples=200, deadline=None)
@given(generated=pair_files())
def test_good_rows_kept_exactly_and_malformed_rows_skipped(tmp_path_factory, generated):
    content, good, bad_lines = generated
    path = tmp_path_factory.getbasetemp() / "generated.tsv"
    path.write_text(content, encoding="utf-8")
    report = read_examples(path, PAIR, "similarity", label_range=(0.0, 5.0))
    assert report.examples == [example for _, example in good]
    assert [line for line, _ in report.skipped] == bad_lines
