"""still.rows: every format, origins, limit, globs, and every unreadable file as one line."""

import json
import re

import pytest

from still.errors import StillError
from still.rows import BadRow, read_rows, source_files, strict_rows
from still.sections import RowSource

ROWS = [{"q": "a?", "a": "b"}, {"q": "c?", "a": "d"}]


def write(path, text: str | bytes):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def one_line(source) -> str:
    with pytest.raises(StillError) as caught:
        strict_rows(source)
    text = str(caught.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        write(path, "".join(json.dumps(row) + "\n" for row in ROWS))
    elif suffix == ".json":
        write(path, json.dumps({"data": ROWS}))
    elif suffix == ".csv":
        write(path, "q,a\na?,b\nc?,d\n")
    else:
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), path)
    read = strict_rows(RowSource(path=str(path)))
    assert [row for _, row in read] == ROWS
    origins = [origin.rsplit("/", 1)[-1] for origin, _ in read]
    expected = {".jsonl": ["rows.jsonl:1", "rows.jsonl:2"], ".csv": ["rows.csv:2", "rows.csv:3"]}
    assert origins == expected.get(suffix, [f"rows{suffix}[0]", f"rows{suffix}[1]"])


def test_glob_reads_files_in_sorted_order_up_to_the_limit(tmp_path):
    write(tmp_path / "part-1.jsonl", json.dumps(ROWS[1]) + "\n")
    write(tmp_path / "part-0.jsonl", json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[0]) + "\n")
    source = RowSource(path=str(tmp_path / "part-*.jsonl"))
    assert [origin.rsplit("/", 1)[-1] for origin, _ in strict_rows(source)] == [
        "part-0.jsonl:1",
        "part-0.jsonl:3",
        "part-1.jsonl:1",
    ]
    assert len(strict_rows(RowSource(path=source.path, limit=2))) == 2
    assert [p.name for p in source_files(source)] == ["part-0.jsonl", "part-1.jsonl"]


def test_bad_lines_are_bad_rows_at_their_line(tmp_path):
    path = write(tmp_path / "t.jsonl", b'{"q": 1}\n{oops\n\xff\xfe{"q": 2}\n[1, 2]\n')
    read = list(read_rows(RowSource(path=str(path))))
    assert [origin.rsplit(":", 1)[-1] for origin, _ in read] == ["1", "2", "3", "4"]
    assert read[0][1] == {"q": 1} and read[3][1] == [1, 2]  # formats says what a row must be
    assert isinstance(read[1][1], BadRow) and "invalid JSON" in read[1][1].reason
    assert isinstance(read[2][1], BadRow) and "not UTF-8" in read[2][1].reason
    assert "t.jsonl:2: invalid JSON" in one_line(RowSource(path=str(path)))


def test_a_byte_order_mark_is_not_part_of_the_first_key(tmp_path):
    path = write(tmp_path / "t.jsonl", "\ufeff" + json.dumps(ROWS[0]) + "\n")
    assert strict_rows(RowSource(path=str(path)))[0][1] == ROWS[0]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("t.json", b'[{"q": 1},\n oops]', r"t\.json:2: invalid JSON \(Expecting value\)$"),
        ("t.json", b'{"q": 1}', r"t\.json: expected a list of objects"),
        ("t.json", b'[{"q": "\xff"}]', r"t\.json:1: not UTF-8 text .*\(save the file as UTF-8\)$"),
        ("t.csv", b"q,a\nx,y\n\xe9,z\n", r"t\.csv:3: not UTF-8 text .*\(save the file as UTF-8\)$"),
        ("t.parquet", b"PAR1 this is not parquet", r"t\.parquet: not a readable Parquet file \("),
        ("t.txt", b"hello", r"t\.txt: unsupported file type '\.txt' \(use \.jsonl"),
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path, name, content, expected):
    path = write(tmp_path / name, content)
    assert re.search(expected, one_line(RowSource(path=str(path))))


def test_missing_files_directories_and_empty_globs(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "sub.jsonl").mkdir()
    write(tmp_path / "a.jsonl", json.dumps(ROWS[0]) + "\n")
    assert "data file not found" in one_line(RowSource(path=str(tmp_path / "nope.jsonl")))
    assert "folder: is a directory, not a data file" in one_line(
        RowSource(path=str(tmp_path / "folder"))
    )
    assert "sub.jsonl: is a directory" in one_line(RowSource(path=str(tmp_path / "*.jsonl")))
    assert "no files match" in one_line(RowSource(path=str(tmp_path / "*.csv")))


def test_unreadable_file_is_one_line_error(tmp_path):
    import os

    path = write(tmp_path / "locked.jsonl", json.dumps(ROWS[0]) + "\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user who reads any file")
        assert "locked.jsonl: cannot read (Permission denied)" in one_line(
            RowSource(path=str(path))
        )
    finally:
        path.chmod(0o600)


def test_hub_datasets_read_a_split_up_to_the_limit(tmp_path):
    folder = tmp_path / "dataset"
    folder.mkdir()
    write(folder / "train.jsonl", "".join(json.dumps(row) + "\n" for row in ROWS))
    write(folder / "test.jsonl", json.dumps({"q": "t?", "a": "t"}) + "\n")
    read = strict_rows(RowSource(hf=str(folder), split="test"))
    assert read == [(f"{folder}[0]", {"q": "t?", "a": "t"})]
    assert [row for _, row in strict_rows(RowSource(hf=str(folder), limit=1))] == ROWS[:1]


def test_hub_dataset_that_cannot_load_is_one_line_error():
    text = one_line(RowSource(hf="nobody/no-such-dataset"))
    assert "could not load dataset 'nobody/no-such-dataset' (split 'train')" in text
