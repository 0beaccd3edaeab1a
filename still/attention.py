"""Packed sdpa: attention for padding-free batches without a [tokens × tokens] mask.

A packed row holds several examples back to back, with position_ids restarting at 0 for each.
sdpa cannot see those boundaries, so packing used to hand it a 4-D block-diagonal mask. That
mask costs the square of the row's length in memory and compute, and on CUDA any explicit
mask keeps sdpa off its flash kernel. `PACKED_SDPA` instead runs sdpa once per example with
`is_causal` (the flash kernel on CUDA), or on CUDA all examples in one call of torch's varlen
flash kernel (`_Varlen`): attention then costs the sum of the examples' squared lengths, and no
mask is built. The examples are found from position_ids, which every decoder
layer receives; they are read to the host once per forward and shared by all layers.

It is sdpa in every other case, so a switched model still evaluates and generates: with a
padding mask, a KV cache or a custom mask it builds and uses sdpa's own mask. Sliding-window
layers (Gemma-2/3, Mistral, Qwen-2/3) get their window inside each example. Only decoders whose
attention goes through transformers' AttentionInterface, with full or sliding-window layers,
are switched (`use_packed_sdpa`); the name is never saved, since transformers does not write
the attention implementation into config.json.
"""

from __future__ import annotations

import inspect
import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from still.models import base_model

PACKED_SDPA = "still_packed_sdpa"
# The same without the varlen kernel: sdpa once per example everywhere (what packed sdpa does
# on CPU); chosen explicitly, to measure the kernel against it.
PACKED_SDPA_LOOP = "still_packed_sdpa_loop"
PACKED_IMPLEMENTATIONS = (PACKED_SDPA, PACKED_SDPA_LOOP)
# How packing keeps examples apart: `packed_attention` picks for the models ("auto"), or the
# caller insists on the block-diagonal mask or on the per-example loop.
PACKING_ATTENTION = ("auto", "block_mask", "loop")
_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _packed_mask(*args, **kwargs):
    """No mask where packed sdpa handles causality itself, else sdpa's own mask."""
    no_cache = kwargs.get("q_offset", 0) == 0 and kwargs.get("q_length") == kwargs.get("kv_length")
    if kwargs.get("attention_mask") is None and no_cache and not kwargs.get("use_vmap", False):
        return None
    return sdpa_mask(*args, **kwargs)


class _Segments:
    """Per row, the (start, end) of each example, from position_ids; one host read per forward."""

    def __init__(self):
        self._key: torch.Tensor | None = None
        self._rows: list[list[tuple[int, int]]] = []

    def __call__(self, position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
        if position_ids is not self._key:  # the same tensor reaches every layer of one forward
            ids = position_ids.detach().to("cpu").expand(rows, -1)
            # a new example wherever the position does not continue the previous one
            starts = torch.ones_like(ids, dtype=torch.bool)
            starts[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
            segments = []
            for row in starts:
                edges = row.nonzero().flatten().tolist() + [row.numel()]
                segments.append(list(zip(edges[:-1], edges[1:])))
            self._key, self._rows = position_ids, segments
        return self._rows


_segments = _Segments()


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """[1, 1, n, n] bool: causal, and each token sees itself and the window - 1 before it."""
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    return ((k <= q) & (k > q - window))[None, None]


def _per_example(module, query, key, value, rows, *, dropout, scaling, sliding_window, **kwargs):
    out_rows = []
    for row, segments in enumerate(rows):
        pieces = []
        for start, end in segments:
            window = None
            if sliding_window is not None and end - start > sliding_window:
                window = _window_mask(end - start, sliding_window, query.device)
            piece, _ = sdpa_attention_forward(
                module,
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                window,
                dropout=dropout,
                scaling=scaling,
                **kwargs,
            )
            pieces.append(piece)
        out_rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return out_rows[0] if len(out_rows) == 1 else torch.cat(out_rows, dim=0)


class _Varlen:
    """torch's FlashAttention-2 varlen kernel (`torch.nn.attention.varlen`, CUDA): every example
    of a packed batch in one call per layer, instead of one sdpa call (and launch) per example.

    Its keywords changed between torch releases (is_causal in 2.10; window_size, scale and
    enable_gqa later), so the signature is read, and a case it cannot express falls back to the
    per-example loop. The kernel is used on a device, dtype and head layout only after a check
    there found its output and gradients equal to the loop's on a small packed batch; a failed
    check prints one line and leaves the loop in place.
    """

    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16)  # a flash-attention kernel

    def __init__(self):
        self.checked: dict[tuple, bool] = {}
        self._offsets: tuple = (None, None, 0)  # rows, their cu_seqlens on the device, longest
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            self.fn, self.params = None, frozenset()
        else:
            self.fn, self.params = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)

    def covers(self, module, query, key, *, dropout, scaling, sliding_window, softcap) -> bool:
        if (
            self.fn is None
            or query.device.type not in self.devices
            or query.dtype not in self.dtypes
        ):
            return False
        if dropout or softcap is not None:
            return False
        if sliding_window is not None and "window_size" not in self.params:
            return False
        default_scale = scaling is None or math.isclose(
            scaling, query.shape[-1] ** -0.5, rel_tol=1e-6
        )
        if not default_scale and "scale" not in self.params:
            return False
        layout = (
            str(query.device),
            query.dtype,
            query.shape[1],
            key.shape[1],
            query.shape[-1],
            None if default_scale else scaling,
            sliding_window,
        )
        if layout not in self.checked:
            self.checked[layout] = self._check(
                module, query, key, scaling=scaling, sliding_window=sliding_window
            )
        return self.checked[layout]

    def __call__(self, query, key, value, rows, *, scaling, sliding_window):
        batch, heads, length, head_dim = query.shape
        kv_heads = key.shape[1]
        q, k, v = (
            x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim)
            for x in (query, key, value)
        )
        options = {}
        if kv_heads != heads:
            if "enable_gqa" in self.params:
                options["enable_gqa"] = True
            else:  # query head h reads key/value head h // (heads / kv_heads), as repeat_kv does
                k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
        if "window_size" in self.params:
            options["window_size"] = (-1 if sliding_window is None else sliding_window - 1, 0)
        else:
            options["is_causal"] = True
        if scaling is not None and "scale" in self.params:
            options["scale"] = scaling
        cu, longest = self._cu_seqlens(rows, length, query.device)
        out = self.fn(q, k, v, cu, cu, longest, longest, **options)
        return out.reshape(batch, length, heads, head_dim)

    def _cu_seqlens(self, rows, length: int, device) -> tuple[torch.Tensor, int]:
        """Example offsets in the flattened batch, copied to the device once per forward (every
        layer gets the same cached `rows`)."""
        if rows is not self._offsets[0] or self._offsets[1].device != device:
            starts = [
                row * length + start for row, segments in enumerate(rows) for start, _ in segments
            ]
            cu = torch.tensor([*starts, len(rows) * length], dtype=torch.int32, device=device)
            longest = max(end - start for segments in rows for start, end in segments)
            self._offsets = (rows, cu, longest)
        return self._offsets[1], self._offsets[2]

    def _check(self, module, query, key, *, scaling, sliding_window) -> bool:
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the first call may be in eval
                agree = self._agrees(
                    module, query, key, scaling=scaling, sliding_window=sliding_window
                )
            problem = "its output or gradients differed from per-example sdpa"
        except Exception as exc:  # noqa: BLE001 — any failure of an optional kernel: do not use it
            agree, problem = (
                False,
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            )
        if not agree:
            print(
                f"still: torch's varlen attention failed its check on {query.device} {query.dtype} "
                f"({problem}); packed sdpa runs sdpa per example"
            )
        return agree

    def _agrees(self, module, query, key, *, scaling, sliding_window) -> bool:
        """Two rows of a few examples, random values in the layer's layout: kernel vs loop."""
        heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[-1]
        generator = torch.Generator(device="cpu").manual_seed(0)

        def random(*shape, grad=True):
            x = torch.randn(*shape, generator=generator).to(query.device, query.dtype)
            return x.requires_grad_(grad)

        q, k, v = (
            random(2, heads, 37, head_dim),
            random(2, kv_heads, 37, head_dim),
            random(2, kv_heads, 37, head_dim),
        )
        upstream = random(2, 37, heads, head_dim, grad=False)
        rows = [[(0, 13), (13, 30), (30, 37)], [(0, 21), (21, 37)]]
        window = None if sliding_window is None else min(sliding_window, 5)  # so that it bites
        results = []
        for kernel in (False, True):
            if kernel:
                out = self(q, k, v, rows, scaling=scaling, sliding_window=window)
            else:
                out = _per_example(
                    module, q, k, v, rows, dropout=0.0, scaling=scaling, sliding_window=window
                )
            results.append([out, *torch.autograd.grad(out, (q, k, v), upstream)])
        tolerance = 1e-4 if query.dtype == torch.float32 else 3e-2
        return all(
            torch.allclose(a.float(), b.float(), atol=tolerance, rtol=tolerance)
            for a, b in zip(*results)
        )


_varlen = _Varlen()


def packed_sdpa_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout=0.0,
    scaling=None,
    sliding_window=None,
    position_ids=None,
    varlen: bool = True,
    **kwargs,
):
    """AttentionInterface function: query/key/value [batch, heads, tokens, head_dim]."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is not None or query.shape[2] == 1 or not causal:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[2] != key.shape[2] or kwargs.get("position_bias") is not None:
        raise RuntimeError(
            f"{PACKED_SDPA}: unmasked attention of {query.shape[2]} queries over "
            f"{key.shape[2]} keys (or with a position bias) is not supported"
        )
    kwargs.pop("is_causal", None)
    return _attend(
        module,
        query,
        key,
        value,
        position_ids,
        dropout=dropout,
        scaling=scaling,
        sliding_window=sliding_window,
        varlen=varlen,
        **kwargs,
    ), None


def packed_sdpa_loop_forward(*args, **kwargs):
    return packed_sdpa_forward(*args, varlen=False, **kwargs)


@torch.compiler.disable  # host reads and a data-dependent loop: eager, between compiled graphs
def _attend(
    module, query, key, value, position_ids, *, dropout, scaling, sliding_window, varlen, **kwargs
):
    if position_ids is None:
        rows = [[(0, query.shape[2])]] * query.shape[0]
    else:
        rows = _segments(position_ids, query.shape[0])
    if varlen and _varlen.covers(
        module,
        query,
        key,
        dropout=dropout,
        scaling=scaling,
        sliding_window=sliding_window,
        softcap=kwargs.get("softcap"),
    ):
        return _varlen(query, key, value, rows, scaling=scaling, sliding_window=sliding_window)
    return _per_example(
        module,
        query,
        key,
        value,
        rows,
        dropout=dropout,
        scaling=scaling,
        sliding_window=sliding_window,
        **kwargs,
    )


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionInterface.register(PACKED_SDPA_LOOP, packed_sdpa_loop_forward)
for _name in PACKED_IMPLEMENTATIONS:
    AttentionMaskInterface.register(_name, _packed_mask)


def implementation(model) -> str:
    """The attention implementation a model (or a PEFT model's base) runs."""
    return base_model(model).config._attn_implementation


def packed_sdpa_unsupported(model) -> str | None:
    """Why `model` cannot switch to packed sdpa, or None when it can."""
    base = base_model(model)
    config = base.config
    if config._attn_implementation not in ("sdpa", *PACKED_IMPLEMENTATIONS):
        return f"attention is {config._attn_implementation}, not sdpa"
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not use transformers' AttentionInterface"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= _LAYER_TYPES:
        return f"its layers include {sorted(layer_types - _LAYER_TYPES)}"
    if getattr(config, "attention_chunk_size", None):
        return "it uses chunked attention"
    if any(getattr(config, name, None) is not None for name in ("vision_config", "audio_config")):
        return "it is multimodal"
    return None


def use_packed_sdpa(model, *, varlen: bool = True) -> bool:
    """Switch an sdpa decoder to packed sdpa (`varlen=False`: never the varlen kernel); False
    (unchanged) where that is not known to be exact."""
    if packed_sdpa_unsupported(model) is not None:
        return False
    name = PACKED_SDPA if varlen else PACKED_SDPA_LOOP
    base = base_model(model)
    base.set_attn_implementation(name)
    return base.config._attn_implementation == name


def packed_attention(*models, choice: str = "auto") -> str:
    """Switch the models' attention for packed batches; how the batches must then keep
    examples apart for every model that reads them. Callers call it once, before training.

    "position_ids" when each model isolates them from position_ids alone: flash-attention's
    varlen kernels do, and sdpa decoders are switched to packed sdpa here. Otherwise
    "block_mask" (eager attention, a model packed sdpa does not cover, or `choice:
    block_mask`): the collator then adds the 4-D block-diagonal mask, which switched models
    also honour. `choice: loop` switches to packed sdpa without the varlen kernel.
    """
    if choice not in PACKING_ATTENTION:
        raise ValueError(f"choice={choice!r}: expected one of {PACKING_ATTENTION}")
    if choice == "block_mask":
        return "block_mask"
    isolated = [
        implementation(model).startswith("flash_attention")
        or use_packed_sdpa(model, varlen=choice == "auto")
        for model in models
        if model is not None
    ]
    return "position_ids" if all(isolated) else "block_mask"


def sliding_window(model) -> int | None:
    """The window of the model's sliding-window layers, or None when it has none."""
    config = base_model(model).config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None
