"""Property: every reader of a file a user hands the kit either succeeds or raises StillError
(one line for the CLI), never another exception, whatever bytes the file holds.

Each reader gets random bytes, truncations and bit flips of a valid file, and the valid file in
the wrong encoding (UTF-16/32, latin-1, a BOM, NUL bytes): data rows (.jsonl/.json/.csv/
.parquet), task YAMLs and task data, GGUF files, safetensors files and model dirs, and a run
dir's lineage.json, metrics.jsonl and recipe.resolved.yaml. Where a check passes, the library
behind it must then read the file without error: that is what the check is for.
"""

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from still import models
from still.errors import StillError
from still.model_files import check_gguf, check_safetensors, open_gguf
from still.rows import read_rows, strict_rows
from still.rundir import RunDir
from still.sections import RowSource

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ROWS = [
    {"question": "What does abs do?", "answer": "Return the absolute value — «é»."},
    {"question": "What does len do? 🙂", "answer": "Return the number of items."},
]
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252", "utf-8-sig"]


def mangled(valid: bytes, text: str | None = None) -> st.SearchStrategy[bytes]:
    """Random bytes, a prefix of `valid`, `valid` with bytes overwritten or a NUL inserted,
    and (for text) `text` in another encoding."""
    size = max(len(valid), 1)
    flips = st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), max_size=6)
    variants = [
        st.binary(max_size=600),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        flips.map(lambda changes: _overwrite(valid, changes)),
        st.integers(0, len(valid)).map(lambda n: valid[:n] + b"\x00" + valid[n:]),
    ]
    if text is not None:
        variants.append(
            st.sampled_from(ENCODINGS).map(lambda enc: text.encode(enc, errors="replace"))
        )
        variants.append(
            st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]).map(
                lambda bom: bom + valid
            )
        )
    return st.one_of(variants)


def _overwrite(valid: bytes, changes) -> bytes:
    data = bytearray(valid)
    for position, value in changes:
        if position < len(data):
            data[position] = value
    return bytes(data)


def holds(call):
    """Run `call`; a StillError is an accepted outcome, any other exception fails the test."""
    try:
        return call()
    except StillError as error:
        assert str(error).strip() and "\n" not in error.message
        return None


@pytest.fixture
def scratch():
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- data rows
JSONL = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in ROWS)
JSON_TEXT = json.dumps({"data": ROWS}, ensure_ascii=False, indent=1)
CSV = "question,answer\n" + "".join(f'"{r["question"]}","{r["answer"]}"\n' for r in ROWS)


def _parquet_bytes() -> bytes:
    import pyarrow
    import pyarrow.parquet

    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), buffer)
    return buffer.getvalue()


def _read_all(path: Path) -> None:
    source = RowSource(path=str(path))
    list(read_rows(source))
    strict_rows(source)


@pytest.mark.parametrize(
    "suffix, text", [(".jsonl", JSONL), (".json", JSON_TEXT), (".csv", CSV)], ids=str
)
def test_text_data_files(suffix, text):
    @FUZZ
    @given(data=mangled(text.encode(), text))
    def check(data):
        with tempfile.TemporaryDirectory() as directory:
            holds(lambda: _read_all(_write(Path(directory), f"rows{suffix}", data)))

    check()


@FUZZ
@given(data=mangled(_parquet_bytes()))
def test_parquet_files(data):
    with tempfile.TemporaryDirectory() as directory:
        holds(lambda: _read_all(_write(Path(directory), "rows.parquet", data)))


# --------------------------------------------------------------------------- task files
TASK = 'name: t\ntype: generate\ndata: {path: rows.jsonl}\nprompt: "{{ question }}"\n'
TASK += 'target: "{{ answer }}"\n'


def _load_task_and_rows(directory: Path) -> None:
    from eval.tasks import load_task, task_rows

    task_rows(load_task(directory / "task.yaml"))


@FUZZ
@given(data=mangled(JSONL.encode(), JSONL))
def test_task_data_files(data):
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        _write(directory, "task.yaml", TASK.encode())
        _write(directory, "rows.jsonl", data)
        holds(lambda: _load_task_and_rows(directory))


@settings(FUZZ, report_multiple_bugs=False)
@given(data=mangled(TASK.encode(), TASK))
def test_task_yaml_files(data):
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        _write(directory, "rows.jsonl", JSONL.encode())
        _write(directory, "task.yaml", data)
        holds(lambda: _load_task_and_rows(directory))


# --------------------------------------------------------------------------- GGUF
def _valid_gguf() -> bytes:
    from bad_model_files import write_gguf

    with tempfile.TemporaryDirectory() as directory:
        return write_gguf(Path(directory) / "valid.gguf").read_bytes()


GGUF = _valid_gguf()


@FUZZ
@given(data=mangled(GGUF))
def test_gguf_files(data, monkeypatch, tmp_path):
    monkeypatch.setenv("STILL_CACHE", str(tmp_path / "cache"))
    with tempfile.TemporaryDirectory() as directory:
        path = _write(Path(directory), "model.gguf", data)
        # the check passes exactly when gguf's reader then reads the whole file
        reader = holds(lambda: open_gguf(path))
        if reader is not None:
            assert len(reader.tensors) <= 2
        elif data != GGUF:
            with pytest.raises(StillError):
                models.resolve(str(path))  # refused before any conversion is tried
            assert not (tmp_path / "cache").exists()


def test_the_valid_gguf_passes(tmp_path):
    path = _write(tmp_path, "model.gguf", GGUF)
    check_gguf(path)
    assert [t.name for t in open_gguf(path).tensors] == ["token_embd.weight", "output_norm.weight"]


# --------------------------------------------------------------------------- safetensors
def _valid_safetensors() -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save(
        {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.int64)},
        metadata={"format": "pt"},
    )


SAFETENSORS = _valid_safetensors()


def _read_safetensors(path: Path) -> None:
    from safetensors import safe_open

    tensors = check_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(tensors)
        for name in handle.keys():
            assert list(handle.get_tensor(name).shape) == tensors[name]["shape"]


@FUZZ
@given(data=mangled(SAFETENSORS))
def test_safetensors_files(data):
    with tempfile.TemporaryDirectory() as directory:
        holds(lambda: _read_safetensors(_write(Path(directory), "model.safetensors", data)))


DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def safetensors_headers(draw) -> bytes:
    """Plausible headers: real dtypes and shapes, offsets sometimes off by a little."""
    tensors, offset = {}, 0
    for index in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = DTYPES[dtype]
        for dim in shape:
            size *= dim
        begin = offset + draw(st.sampled_from([0, 0, 0, 1, -1]))
        end = begin + size + draw(st.sampled_from([0, 0, 0, 2, -2]))
        tensors[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        offset = end
    header = json.dumps(tensors).encode()
    data = bytes(max(offset + draw(st.sampled_from([0, 0, 1, -1])), 0))
    length = len(header) + draw(st.sampled_from([0, 0, 0, 3, -3]))
    return length.to_bytes(8, "little", signed=True) + header + data


@FUZZ
@given(data=safetensors_headers())
def test_safetensors_headers(data):
    with tempfile.TemporaryDirectory() as directory:
        holds(lambda: _read_safetensors(_write(Path(directory), "model.safetensors", data)))


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_model_dirs(name, tiny_model_dir):
    valid = (tiny_model_dir / name).read_bytes()
    text = valid.decode() if name.endswith(".json") else None

    @FUZZ
    @given(data=mangled(valid, text))
    def check(data):
        with tempfile.TemporaryDirectory() as directory:
            model_dir = Path(directory) / "model"
            shutil.copytree(tiny_model_dir, model_dir)
            _write(model_dir, name, data)
            holds(lambda: models.verify(models.resolve(str(model_dir)), trust_remote_code=False))

    check()


# --------------------------------------------------------------------------- run dirs
LINEAGE = json.dumps({"kind": "finetune", "name": "r", "base": "builtin:x", "data": []})
METRICS = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'
RESOLVED = "# Resolved from /tmp/r.yaml\nkind: finetune\nname: r\nmodel: {ref: x}\n"


def _read_run_dir(path: Path) -> None:
    run = RunDir(path)
    run.read_lineage()
    run.metrics()
    run.recipe_data()
    run.recipe_source()
    run.tracker_run_id()
    models.resolve(str(path))  # an adapter run dir: reads lineage.json for its base


@pytest.mark.parametrize(
    "name, text",
    [("lineage.json", LINEAGE), ("metrics.jsonl", METRICS), ("recipe.resolved.yaml", RESOLVED)],
    ids=str,
)
def test_run_dir_files(name, text, tiny_model_dir):
    @FUZZ
    @given(data=mangled(text.encode(), text))
    def check(data):
        with tempfile.TemporaryDirectory() as directory:
            run_dir = Path(directory) / "run"
            (run_dir / "adapter").mkdir(parents=True)
            for file, content in (
                ("lineage.json", json.dumps({"base": str(tiny_model_dir)})),
                ("metrics.jsonl", METRICS),
                ("recipe.resolved.yaml", RESOLVED),
            ):
                _write(run_dir, file, content.encode())
            _write(run_dir, name, data)
            (run_dir / "adapter" / "adapter_config.json").write_text("{}")
            holds(lambda: _read_run_dir(run_dir))

    check()


def test_fuzzing_reaches_past_the_checks(tiny_model_dir, tmp_path):
    """The valid inputs the strategies start from are read without error (so the fuzz is
    not only ever exercising the refusals)."""
    for suffix, text in ((".jsonl", JSONL), (".json", JSON_TEXT), (".csv", CSV)):
        assert (
            len(strict_rows(RowSource(path=str(_write(tmp_path, "r" + suffix, text.encode())))))
            == 2
        )
    assert (
        len(strict_rows(RowSource(path=str(_write(tmp_path, "r.parquet", _parquet_bytes()))))) == 2
    )
    _read_safetensors(_write(tmp_path, "model.safetensors", SAFETENSORS))
    _write(tmp_path, "task.yaml", TASK.encode())
    _write(tmp_path, "rows.jsonl", JSONL.encode())
    _load_task_and_rows(tmp_path)
    assert os.path.isdir(models.resolve(str(tiny_model_dir)).weights)
