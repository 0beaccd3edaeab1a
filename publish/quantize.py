"""K-quant GGUF files (q4_k_m, q5_k_m, q6_k) written by llama.cpp's own quantizer.

The `gguf` package quantizes q8_0 and q4_0 but not the k-quants, and q4_k_m is a mix (some
tensors at q6_k, chosen per layer by llama.cpp's rules), so these go through llama.cpp:
publish/gguf.py writes the model as an f32 GGUF, and `llama_model_quantize` (llama-cpp-python's
binding of llama.cpp's C API) turns it into the type. Nothing here quantizes a number itself.

The importance matrix is what llama.cpp's `llama-imatrix` computes: for every matrix, the mean
of each input column's squared activation over calibration text (per expert for MoE experts).
Here it is collected with forward hooks on the fp32 transformers model, on the recipe's own
data, and handed to the quantizer through the C API's `imatrix` field — for the matrices that
take a k-quant type only (rows a multiple of 256). Matrices llama.cpp writes in a legacy
fallback type get none: on the quickstart student (576-wide rows), an imatrix on its q5_1
fallback raised q5_k_m's KL to fp32 from 0.108 to 0.460 per token, while restricted to the
k-quant matrices it took q4_k_m from 0.064 to 0.045 and q6_k from 0.013 to 0.0095
(docs/publishing.md).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from still.errors import StillError

# our name -> llama.cpp's file type (`enum llama_ftype`)
LLAMA_CPP_TYPES = {
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
# k-quant super-blocks: a row must be a multiple of 256 to take a k-quant type; llama.cpp falls
# back to a legacy type (q5_0 / q8_0 ...) for a tensor whose rows are not.
QK_K = 256


def quantize(
    source: Path,
    out: Path,
    gguf_type: str,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
) -> Path:
    """llama.cpp's quantizer on an f32/f16 GGUF `source`, writing `out` as `gguf_type`."""
    from eval.llama_cpp import runtime

    llama_cpp = runtime()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[gguf_type])
    params.nthread = max(1, len(os.sched_getaffinity(0)))
    keep_alive = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, sorted(imatrix.items())):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append((name.encode(), array))
            entry.name = keep_alive[-1][0]
            entry.data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = array.size
        entries[len(imatrix)].name = None  # the C side reads up to a null name
        params.imatrix = entries
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    )
    if status != 0 or not Path(out).is_file():
        raise StillError(f"llama.cpp could not quantize {Path(source).name} to {gguf_type}")
    return Path(out)


def importance_matrix(model, tokenizer, texts: list[str], tensor_name) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean squared input activation per column} over `texts`.

    `tensor_name(hf_module_name)` maps a linear module to the GGUF name of its weight (None to
    skip it). MoE experts are counted per expert from the router's choices.
    """
    import torch

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    hooks = []

    def add(name: str, squares: torch.Tensor, count: torch.Tensor) -> None:
        squares, count = squares.double().cpu().numpy(), count.double().cpu().numpy()
        sums[name] = sums.get(name, 0) + squares
        counts[name] = counts.get(name, 0) + count

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = tensor_name(module_name)
            if name is None:
                continue

            def linear_hook(_module, inputs, _output, name=name):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                add(name, x.pow(2).sum(0), torch.tensor([x.shape[0]]))

            hooks.append(module.register_forward_hook(linear_hook))
        elif (
            hasattr(module, "gate_up_proj")
            and hasattr(module, "down_proj")
            and hasattr(module, "num_experts")
        ):
            hooks.append(_expert_hook(module, module_name, tensor_name, add))
    try:
        with torch.inference_mode():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    matrix = {}
    for name, total in sums.items():
        per_expert = counts[name]
        columns = total.reshape(len(per_expert), -1)
        if columns.shape[1] % QK_K:
            continue  # a fallback (legacy) type: see the module docstring
        # An expert no calibration token reached gets 1 everywhere, as llama.cpp's loader does.
        mean = np.where(per_expert[:, None] > 0, columns / np.maximum(per_expert[:, None], 1), 1.0)
        matrix[name] = mean.reshape(-1).astype(np.float32)
    return matrix


def _expert_hook(module, module_name: str, tensor_name, add):
    """Per-expert squared inputs of a fused-experts module (gate_up and down projections)."""
    import torch

    gate_up = tensor_name(f"{module_name}.gate_proj")
    up = tensor_name(f"{module_name}.up_proj")
    down = tensor_name(f"{module_name}.down_proj")

    def hook(_module, args, _output):
        hidden, top_k_index = args[0].detach().float(), args[1]
        experts = module.num_experts
        hidden_size = hidden.shape[-1]
        inputs = torch.zeros(experts, hidden_size)
        inner = torch.zeros(experts, module.down_proj.shape[-1])
        count = torch.zeros(experts)
        for expert in range(experts):
            tokens = (top_k_index == expert).any(-1)
            if not tokens.any():
                continue
            x = hidden[tokens]
            gate, value = torch.nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, -1)
            inputs[expert] = x.pow(2).sum(0)
            inner[expert] = (module.act_fn(gate) * value).pow(2).sum(0)
            count[expert] = x.shape[0]
        for name in (gate_up, up):
            if name is not None:
                add(name, inputs.reshape(-1), count)
        if down is not None:
            add(down, inner.reshape(-1), count)

    return module.register_forward_hook(hook)
