"""One GGUF file of a publish, written and proven before it ships.

  f16, q8_0, q4_0          written by publish/gguf.py with the `gguf` package's quantizers;
                           loaded back by transformers: exact beyond the file's own rounding,
                           and within the type's drift from fp32.
  q4_k_m, q5_k_m, q6_k     an f32 GGUF quantized by llama.cpp (publish/quantize.py) with an
                           importance matrix from the run's training data; loaded back by
                           transformers for the drift from fp32.
Then every file, when the llama.cpp runtime is installed (always for the k-quants, which need
it), is run in llama.cpp (publish/llama_cpp_check.py): same tokens, per-token log-likelihoods
and greedy text against the fp32 model.
"""

from __future__ import annotations

from pathlib import Path

from publish.gguf import GGUF_TYPES as PACKAGE_TYPES
from publish.gguf import (
    arch_spec,
    check_config,
    export_gguf,
    tensor_namer,
    verify_gguf,
)
from publish.quantize import LLAMA_CPP_TYPES, importance_matrix, quantize
from still.errors import StillError

GGUF_TYPES = (*PACKAGE_TYPES, *LLAMA_CPP_TYPES)


def check_types(gguf_types, config) -> None:
    """Before any work: every type is known, the architecture exports, and the runtime the
    k-quants need is installed."""
    from eval.llama_cpp import runtime

    unknown = [t for t in gguf_types if t not in GGUF_TYPES]
    if unknown:
        raise StillError(
            f"unknown GGUF type '{unknown[0]}'", hint=f"choose from {', '.join(GGUF_TYPES)}"
        )
    if gguf_types and config is not None:
        arch_spec(config)
    quantized = [t for t in gguf_types if t in LLAMA_CPP_TYPES]
    if quantized:
        runtime(f"GGUF {quantized[0]} (written by llama.cpp's quantizer)")


class KQuantSource:
    """The f32 GGUF and the importance matrix every k-quant of one publish is quantized from.
    Made on first use and once (for an 8B model the f32 file is 32 GB and the matrix a pass
    over the calibration texts), and removed when the `with` block ends."""

    def __init__(self, model, tokenizer, directory: Path, *, name, license, calibration):
        self.model, self.tokenizer, self.calibration = model, tokenizer, calibration
        self.name, self.license = name, license
        self.path = Path(directory) / f".{name}.f32.gguf"
        self.imatrix: dict | None = None

    def __enter__(self) -> KQuantSource:
        return self

    def __exit__(self, *_exc) -> None:
        self.path.unlink(missing_ok=True)

    def prepare(self) -> tuple[Path, dict]:
        if self.imatrix is None:
            model = self.model
            export_gguf(
                model, self.tokenizer, self.path, "f32", name=self.name, license=self.license
            )
            check_config(self.path, model.config)
            self.imatrix = importance_matrix(
                model, self.tokenizer, self.calibration, tensor_namer(model)
            )
        return self.path, self.imatrix


def write_gguf(
    model,
    tokenizer,
    path: Path,
    gguf_type: str,
    *,
    name: str,
    license: str | None,
    texts: list[str],
    k_quants: KQuantSource | None,
    check_tokenizer: bool,
) -> dict:
    """Write `path` as `gguf_type` from the fp32 `model`, check it; returns the report. A
    k-quant is made from `k_quants`, shared by every type of the publish."""
    from eval.llama_cpp import runtime_version

    if gguf_type in LLAMA_CPP_TYPES:
        if k_quants is None:
            raise ValueError(f"{gguf_type} is quantized from a KQuantSource")
        source, imatrix = k_quants.prepare()
        quantize(source, path, gguf_type, imatrix=imatrix)
        report = verify_gguf(
            path, model, tokenizer, gguf_type, texts, check_tokenizer=check_tokenizer, exact=False
        )
        report["imatrix"] = {"tensors": len(imatrix), "texts": len(k_quants.calibration)}
    else:
        export_gguf(model, tokenizer, path, gguf_type, name=name, license=license)
        check_config(path, model.config)
        report = verify_gguf(
            path, model, tokenizer, gguf_type, texts, check_tokenizer=check_tokenizer
        )
    if runtime_version() is not None:
        from publish.llama_cpp_check import check_in_llama_cpp

        report["llama_cpp"] = check_in_llama_cpp(path, model, tokenizer, texts, gguf_type)
    report.update(file=path.name, bytes=path.stat().st_size)
    return report
