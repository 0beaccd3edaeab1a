"""Rows: the one reader of data files and hub datasets, for training data and eval tasks alike.

`read_rows(source)` yields `(origin, row)` in file order. The origin is `file:line` (JSON
Lines, CSV), `file[i]` (JSON, Parquet) or `dataset[i]` (hub); the row is the parsed value (an
object, in well-formed data) or a `BadRow` saying why that one row is unreadable (invalid JSON
or text that is not UTF-8 on its line). Callers choose what a bad row means: training data
skips or stops per data.on_bad_rows; `strict_rows` stops at the first.

Every way a file can fail to be read (missing, a directory, unreadable, not UTF-8, corrupt
Parquet, an unsupported extension) is turned into one `StillError` line here, so no caller
opens, decodes or parses a data file itself.

A source is anything with `path` (a file or glob), `hf`, `subset`, `split` and `limit`:
`still.sections.RowSource` and the sections built on it.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from pathlib import Path

from still.errors import StillError
from still.holdout import split_rows
from still.sections import RowSource


class BadRow(Exception):
    """A row that cannot become an example: `reason` says what is wrong, `hint` how to fix it."""

    def __init__(self, reason: str, hint: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


# A parsed row is whatever the file holds (a JSON line may be a list); formats.row_to_example
# and the eval tasks say which rows they accept.
Row = tuple[str, "object | BadRow"]


# --------------------------------------------------------------------------- files
def source_files(source: RowSource) -> list[Path]:
    """The files a local source names, in sorted order for a glob; never a directory."""
    path = source.path
    if any(char in path for char in "*?["):
        files = sorted(Path(match) for match in glob.glob(path, recursive=True))
        if not files:
            raise StillError(f"no files match '{path}'", "check data paths (relative to the YAML)")
        for file in files:
            if file.is_dir():
                raise StillError(
                    f"{file}: is a directory, not a data file",
                    f"narrow the glob '{path}' to files, e.g. end it in *.jsonl",
                )
        return files
    if Path(path).is_dir():
        raise StillError(
            f"{path}: is a directory, not a data file",
            f"name a file, or a glob such as {path.rstrip('/')}/*.jsonl",
        )
    if not Path(path).is_file():
        raise StillError(f"data file not found: {path}", "check the path (relative to the YAML)")
    return [Path(path)]


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise StillError(
            f"{path}:{line}: not UTF-8 text ({error.reason})", "save the file as UTF-8"
        ) from None


# The first bytes of files that are not UTF-8 text at all, whatever their name says.
NOT_TEXT = (
    (b"\xff\xfe\x00\x00", "UTF-32 encoded", "save it as UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 encoded", "save it as UTF-8"),
    (b"\xff\xfe", "UTF-16 encoded", "save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8"),
    (b"\xfe\xff", "UTF-16 encoded", "save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8"),
    (b"\x1f\x8b", "gzip-compressed", "decompress it first, e.g. gunzip"),
    (b"PK\x03\x04", "a zip archive", "extract it first"),
    (b"PAR1", "a Parquet file", "name it .parquet"),
)


def _refuse_non_text(path: Path) -> None:
    """A whole file in another encoding is one error, not a bad row on every line."""
    with path.open("rb") as handle:
        head = handle.read(512)
    for magic, what, hint in NOT_TEXT:
        if head.startswith(magic):
            raise StillError(f"{path}: {what}, not UTF-8 text", hint)
    if b"\x00" in head:
        even_nuls = head[0::2].count(0) > len(head) // 4 or head[1::2].count(0) > len(head) // 4
        what = "UTF-16 encoded (no byte-order mark)" if even_nuls else "binary data (NUL bytes)"
        raise StillError(f"{path}: {what}, not UTF-8 text", "save it as UTF-8 text")


def _json_error(error: ValueError | RecursionError) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg.removesuffix(' at')} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return "an integer of more than 4300 digits" if "digits" in str(error) else str(error)[:120]


def _refuse_json_array(path: Path, first_line: str) -> None:
    if not first_line.lstrip().startswith("["):
        return
    raise StillError(
        f"{path}: a JSON array, not JSON Lines (one object per line)",
        "name it .json, or write one JSON object per line",
    )


def _read_jsonl(path: Path) -> Iterator[Row]:
    # Bytes, decoded line by line, so an undecodable line is a bad row at its own line number.
    _refuse_non_text(path)
    with path.open("rb") as lines:
        first = True
        for number, raw in enumerate(lines, start=1):
            origin = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield (
                    origin,
                    BadRow(
                        f"not UTF-8 text ({error.reason} at column {error.start + 1})",
                        "save the file as UTF-8",
                    ),
                )
                continue
            if not line.strip():
                continue
            if first:  # a JSON array saved as .jsonl: one error for the file, not per line
                _refuse_json_array(path, line)
                first = False
            try:
                yield origin, json.loads(line)
            except (ValueError, RecursionError) as error:  # ValueError: an int of 4300+ digits
                yield origin, BadRow(f"invalid JSON ({_json_error(error)})", "fix the line")


def _read_json(path: Path) -> Iterator[Row]:
    _refuse_non_text(path)
    try:
        content = json.loads(_decode(path, path.read_bytes()))
    except json.JSONDecodeError as error:
        raise StillError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:
        raise StillError(f"{path}: invalid JSON ({_json_error(error)})") from None
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        content = content["data"]
    if not isinstance(content, list):
        raise StillError(
            f'{path}: expected a list of objects or {{"data": [...]}}',
            "JSON Lines files need the .jsonl extension",
        )
    for index, row in enumerate(content):
        yield f"{path}[{index}]", row


def _read_csv(path: Path) -> Iterator[Row]:
    _refuse_non_text(path)
    reader = csv.DictReader(io.StringIO(_decode(path, path.read_bytes()), newline=""))
    try:
        for row in reader:
            yield f"{path}:{reader.line_num}", row
    except csv.Error as error:
        raise StillError(f"{path}:{reader.line_num}: invalid CSV ({error})") from None


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except UnicodeDecodeError as error:  # a string column holding bytes that are not UTF-8
        raise StillError(
            f"{path}: a text column holds bytes that are not UTF-8 ({error.reason})",
            "write the file again from UTF-8 strings",
        ) from None
    # a damaged file surfaces as ArrowInvalid (a ValueError), or as a plain OSError from the
    # thrift decoder
    except (pyarrow.ArrowException, OSError, ValueError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise StillError(
            f"{path}: not a readable Parquet file ({detail})",
            "check the file: it may be truncated or in another format",
        ) from None
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", row


READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_file(path: Path) -> Iterator[Row]:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise StillError(
            f"{path}: unsupported file type '{path.suffix}'", "use .jsonl, .json, .csv or .parquet"
        )
    try:
        yield from reader(path)
    except OSError as error:  # permissions, a file that vanished or changed into a directory
        reason = (str(error.strerror or error).splitlines() or ["unreadable"])[0]
        raise StillError(f"{path}: cannot read ({reason})") from None


# --------------------------------------------------------------------------- hub
def _read_hub(source: RowSource) -> Iterator[Row]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.hf, source.subset, split=source.split)
    except Exception as error:  # noqa: BLE001 - network, auth, unknown id or split: user-fixable
        detail = (str(error).splitlines() or [type(error).__name__])[0]
        raise StillError(
            f"could not load dataset '{source.hf}' (split '{source.split}'): {detail}",
            "check the id, subset and split, and your network",
        ) from None
    if source.limit is not None:
        dataset = dataset.select(range(min(source.limit, len(dataset))))
    for index, row in enumerate(dataset):
        yield f"{source.hf}[{index}]", row


# --------------------------------------------------------------------------- public API
def read_rows(source: RowSource) -> Iterator[Row]:
    """(origin, row or BadRow) for every row of the source, in order, up to `source.limit`.
    A source with a `holdout` reads its side of the split, drawn over every row first."""
    if source.holdout is not None:
        whole = source.model_copy(update={"holdout": None, "limit": None})
        side = split_rows(read_rows(whole), source.holdout)
        yield from side[: source.limit] if source.limit is not None else side
        return
    if source.hf is not None:
        yield from _read_hub(source)
        return
    count = 0
    for path in source_files(source):
        for item in _read_file(path):
            yield item
            count += 1
            if source.limit is not None and count >= source.limit:
                return


def strict_rows(source: RowSource) -> list[tuple[str, object]]:
    """(origin, row) for every row; the first bad row raises `origin: reason (hint)`."""
    rows = []
    for origin, row in read_rows(source):
        if isinstance(row, BadRow):
            raise StillError(f"{origin}: {row.reason}", row.hint)
        rows.append((origin, row))
    return rows
