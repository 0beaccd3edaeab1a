"""Model files checked before any library reads them: GGUF, safetensors, config.json, pickles.

Every model file the kit opens passes through here first, so a truncated download, a git-lfs
pointer, an HTML error page saved as `model.safetensors` or a config.json that is not JSON is
one line, `path: what is wrong (how to fix)`, instead of a numpy reshape or a Rust panic deep
in a library. The checks read headers only (sizes, magic, offsets), never the tensor data:
`check_gguf` walks a GGUF header with every read bounded by the file size, so `gguf`'s reader,
which trusts the counts and lengths it finds, only ever sees a file whose header is whole.

`check_model_dir` and `check_adapter_dir` apply them to a local transformers dir or PEFT
adapter; `still.models.resolve` calls them for every local reference, and `still check` and
`still run` both go through that, so they refuse the same dirs.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path

from still.errors import StillError

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors refuses headers above 100 MB; anything larger is not a safetensors header.
SAFETENSORS_MAX_HEADER = 100_000_000
SAFETENSORS_DTYPE_BITS = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0"), 8),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 16),
    **dict.fromkeys(("I32", "U32", "F32"), 32),
    **dict.fromkeys(("I64", "U64", "F64", "C64"), 64),
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
REFETCH = "an incomplete download or copy: fetch the file again"


# --------------------------------------------------------------------------- shared
def _head(path: Path, size: int = 64) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError as error:
        raise StillError(f"{path}: cannot read ({error.strerror or error})") from None


def refuse_lfs_pointer(path: Path, head: bytes | None = None) -> None:
    """A git-lfs pointer (a ~130-byte text file) where the model file should be."""
    head = _head(path) if head is None else head
    if head.startswith(LFS_POINTER_PREFIX):
        raise StillError(
            f"{path}: is a git-lfs pointer, not the file itself",
            hint="run `git lfs pull` in the repository it came from",
        )


def _what_it_looks_like(head: bytes) -> str:
    stripped = head.lstrip()
    if not head:
        return "the file is empty"
    if stripped[:1] in (b"<",):
        return "it is text that looks like an HTML page from a failed download"
    if stripped[:1] in (b"{", b"["):
        return "it is text that looks like JSON"
    if head[:4] == b"PK\x03\x04":
        return "it is a zip archive (a PyTorch .bin or .pt?)"
    if head[:1] == b"\x80":
        return "it is a Python pickle"
    if head[:4] == b"GGUF":
        return "it is a GGUF file"
    return f"it starts with {head[:8]!r}"


def read_json_object(path: Path, *, what: str = "file") -> dict:
    """A JSON file that must hold an object (config.json, adapter_config.json, an index)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StillError(f"{path}: cannot read ({error.strerror or error})") from None
    refuse_lfs_pointer(path, data[:64])
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise StillError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})",
            hint=f"the {what} is damaged or not JSON; fetch or write it again",
        ) from None
    except json.JSONDecodeError as error:
        raise StillError(
            f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})",
            hint=f"fix the {what}, or fetch it again",
        ) from None
    except (ValueError, RecursionError) as error:  # an int beyond 4300 digits, deep nesting
        raise StillError(f"{path}: unreadable JSON ({error})", hint=f"fix the {what}") from None
    if not isinstance(value, dict):
        raise StillError(
            f"{path}: expected a JSON object, got {type(value).__name__}",
            hint=f"fix the {what}, or fetch it again",
        )
    return value


# --------------------------------------------------------------------------- safetensors
def check_safetensors(path: str | Path) -> dict:
    """Check a .safetensors file's header against its size; return the header's tensors."""
    path = Path(path)
    size = path.stat().st_size
    head = _head(path)
    refuse_lfs_pointer(path, head)
    if size < 8:
        raise StillError(f"{path}: {size} bytes, too small for a safetensors file", hint=REFETCH)
    (length,) = struct.unpack("<Q", head[:8])
    if length > SAFETENSORS_MAX_HEADER or (length > size - 8 and head[8:9] != b"{"):
        raise StillError(
            f"{path}: not a safetensors file ({_what_it_looks_like(head)})",
            hint="save the weights with safetensors, or fetch the file again",
        )
    if length > size - 8:
        raise StillError(
            f"{path}: truncated safetensors: its header alone needs {length + 8} bytes, the file "
            f"has {size}",
            hint=REFETCH,
        )
    with path.open("rb") as handle:
        handle.seek(8)
        raw = handle.read(length)
    if not raw.startswith(b"{"):
        raise StillError(f"{path}: damaged safetensors header (not a JSON object)", hint=REFETCH)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise StillError(
            f"{path}: damaged safetensors header (not JSON: {str(error)[:80]})", hint=REFETCH
        ) from None
    if not isinstance(header, dict):
        raise StillError(f"{path}: damaged safetensors header (not a JSON object)", hint=REFETCH)
    tensors = _safetensors_tensors(path, header)
    _check_extents(path, tensors, size - 8 - length)
    return tensors


def _safetensors_tensors(path: Path, header: dict) -> dict:
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise StillError(f"{path}: damaged safetensors header (bad __metadata__)", hint=REFETCH)
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        ok = (
            isinstance(info, dict)
            and info.get("dtype") in SAFETENSORS_DTYPE_BITS
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        )
        if not ok:
            raise StillError(
                f"{path}: damaged safetensors header (tensor {name!r}: {str(info)[:80]})",
                hint=REFETCH,
            )
        bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[info["dtype"]]
        if bits != (offsets[1] - offsets[0]) * 8:
            raise StillError(
                f"{path}: damaged safetensors header (tensor {name!r} has shape {shape} "
                f"{info['dtype']} but {offsets[1] - offsets[0]} bytes)",
                hint=REFETCH,
            )
    return header


def _check_extents(path: Path, tensors: dict, data_size: int) -> None:
    end = 0
    for name, info in sorted(tensors.items(), key=lambda item: item[1]["data_offsets"]):
        begin, stop = info["data_offsets"]
        if begin != end:
            raise StillError(
                f"{path}: damaged safetensors header (tensor {name!r} starts at byte {begin} "
                f"of the data, expected {end})",
                hint=REFETCH,
            )
        end = stop
    if end > data_size:
        raise StillError(
            f"{path}: truncated safetensors: its tensors need {end} bytes of data, the file has "
            f"{data_size}",
            hint=REFETCH,
        )
    if end < data_size:
        raise StillError(
            f"{path}: damaged safetensors: {data_size - end} bytes after its last tensor",
            hint=REFETCH,
        )


# --------------------------------------------------------------------------- GGUF
class _Bounded:
    """Reads from a mapped file; every read past the end is a 'truncated' StillError."""

    def __init__(self, path: Path, data, order: str = "<"):
        self.path, self.data, self.order, self.pos = path, data, order, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise StillError(
                f"{self.path}: truncated GGUF: its header runs past the end of the file, "
                f"at {len(self.data)} bytes",
                hint=REFETCH,
            )
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def need(self, count: int) -> None:
        """Refuse counts the rest of the file cannot hold before looping over them."""
        if count > self.remaining():
            self.take(count)  # raises: truncated

    def skip(self, count: int) -> None:
        self.need(count)
        self.pos += count

    def number(self, code: str) -> int | float:
        return struct.unpack(self.order + code, self.take(struct.calcsize(code)))[0]

    def text(self, what: str) -> str:
        length = self.number("Q")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise StillError(f"{self.path}: damaged GGUF: a {what} is not UTF-8", REFETCH) from None

    def remaining(self) -> int:
        return len(self.data) - self.pos


# GGUF value type -> struct code of its fixed-size scalar (8 STRING and 9 ARRAY are read apart)
_GGUF_SCALARS = dict(enumerate("BbHhIifB")) | {10: "Q", 11: "q", 12: "d"}


def _skip_value(reader: _Bounded, value_type: int, depth: int = 0):
    """Step over one metadata value; return it when it is a scalar (for general.alignment)."""
    if value_type in _GGUF_SCALARS:
        return reader.number(_GGUF_SCALARS[value_type])
    if value_type == 8:
        reader.text("metadata string")
        return None
    if value_type != 9 or depth > 8:
        raise StillError(f"{reader.path}: damaged GGUF: metadata type {value_type}", REFETCH)
    item_type, count = reader.number("I"), reader.number("Q")
    if item_type in _GGUF_SCALARS:
        reader.skip(count * struct.calcsize(_GGUF_SCALARS[item_type]))
        return None
    reader.need(count * 8)  # every string or array item takes at least 8 bytes
    for _ in range(count):
        _skip_value(reader, item_type, depth + 1)
    return None


def check_gguf(path: str | Path) -> None:
    """Check a GGUF file's magic, version, header and tensor extents against its size."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    head = _head(path)
    refuse_lfs_pointer(path, head)
    if size == 0:
        raise StillError(f"{path}: empty file (0 bytes), not a GGUF model", hint=REFETCH)
    if head[:4] != b"GGUF":
        raise StillError(
            f"{path}: not a GGUF file ({_what_it_looks_like(head)})",
            hint="name a .gguf model file, or fetch it again",
        )
    if size < 24:
        raise StillError(f"{path}: truncated GGUF: {size} bytes", hint=REFETCH)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        order = "<" if struct.unpack("<I", data[4:8])[0] & 0xFFFF else ">"
        reader = _Bounded(path, data, order)
        reader.take(4)
        version = reader.number("I")
        if version not in gguf.READER_SUPPORTED_VERSIONS:
            raise StillError(
                f"{path}: GGUF version {version} is not supported: the gguf package reads "
                f"versions {', '.join(map(str, gguf.READER_SUPPORTED_VERSIONS))}",
                hint="convert it again with a current llama.cpp",
            )
        tensor_count, kv_count = reader.number("Q"), reader.number("Q")
        alignment = _gguf_metadata(reader, kv_count)
        tensors = _gguf_tensor_infos(reader, tensor_count)
        data_start = -(-reader.pos // alignment) * alignment
        _gguf_extents(path, tensors, data_start, size)


def _gguf_metadata(reader: _Bounded, kv_count: int) -> int:
    reader.need(kv_count * 12)
    # gguf's reader files the header's own fields under these names; a key repeating one clashes
    keys, alignment = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}, 32
    for _ in range(kv_count):
        key = reader.text("metadata key")
        if key in keys:
            raise StillError(f"{reader.path}: damaged GGUF: metadata key {key!r} twice", REFETCH)
        keys.add(key)
        value_type = reader.number("I")
        value = _skip_value(reader, value_type)
        if key == "general.alignment":
            if value_type != 4 or not value or value & (value - 1):
                raise StillError(f"{reader.path}: damaged GGUF: bad general.alignment", REFETCH)
            alignment = value
    return alignment


def _gguf_tensor_infos(reader: _Bounded, tensor_count: int) -> list[tuple]:
    import gguf

    reader.need(tensor_count * 24)
    tensors, names = [], set()
    for _ in range(tensor_count):
        name = reader.text("tensor name")
        n_dims = reader.number("I")
        dims = [reader.number("Q") for _ in range(min(n_dims, 9))]
        raw_type, offset = reader.number("I"), reader.number("Q")
        if name in names or n_dims > 8:
            raise StillError(f"{reader.path}: damaged GGUF: tensor {name!r}", REFETCH)
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise StillError(
                f"{reader.path}: tensor {name!r} has GGML type {raw_type}, which this gguf "
                "package does not know",
                hint="pip install -U gguf, or convert the model again",
            ) from None
        if dims and dims[0] % block:
            raise StillError(f"{reader.path}: damaged GGUF: tensor {name!r} shape {dims}", REFETCH)
        names.add(name)
        tensors.append((name, offset, math.prod(dims) * type_size // block))
    return tensors


def _gguf_extents(path: Path, tensors: list[tuple], data_start: int, size: int) -> None:
    for name, offset, n_bytes in tensors:
        end = data_start + offset + n_bytes
        if end > size:
            raise StillError(
                f"{path}: truncated GGUF: tensor {name!r} ends at byte {end}, the file has {size}",
                hint=REFETCH,
            )


def open_gguf(path: str | Path):
    """`gguf.GGUFReader` on a file that passed `check_gguf` (its errors become StillError)."""
    import gguf

    check_gguf(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as error:
        raise StillError(f"{path}: the gguf package cannot read it ({error})", REFETCH) from None
