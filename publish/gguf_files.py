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


def write_gguf(
    model,
    tokenizer,
    path: Path,
    gguf_type: str,
    *,
    name: str,
    license: str | None,
    texts: list[str],
    calibration: list[str],
    check_tokenizer: bool,
) -> dict:
    """Write `path` as `gguf_type` from the fp32 `model`, check it; returns the report."""
    from eval.llama_cpp import runtime_version

    if gguf_type in LLAMA_CPP_TYPES:
        source = path.with_name(f".{path.stem}.f32.gguf")
        try:
            export_gguf(model, tokenizer, source, "f32", name=name, license=license)
            check_config(source, model.config)
            imatrix = importance_matrix(model, tokenizer, calibration, tensor_namer(model))
            quantize(source, path, gguf_type, imatrix=imatrix)
        finally:
            source.unlink(missing_ok=True)
        report = verify_gguf(
            path, model, tokenizer, gguf_type, texts, check_tokenizer=check_tokenizer, exact=False
        )
        report["imatrix"] = {"tensors": len(imatrix), "texts": len(calibration)}
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
