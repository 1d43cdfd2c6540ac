"""One dispatch point for the quantized linear ops.

Each op runs the compiled extension (`svdquant._C`) when it can run the case (built, has the
kernel, tensor on a GPU it was built for) and the PyTorch reference in `numerics` otherwise.
A fallback is announced with one log line per reason, never an error.
"""

from __future__ import annotations

import logging

import torch

from . import numerics

log = logging.getLogger("svdquant")

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # not built (CPU-only checkout, or install.py not run yet)
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

_announced: set[str] = set()


def _announce_fallback(reason: str) -> None:
    if reason not in _announced:
        _announced.add(reason)
        log.warning("svdquant: using the PyTorch reference path (%s)", reason)


def extension_info() -> dict:
    """What the compiled extension offers here (for `python -m svdquant info` and bug reports)."""
    if _C is None:
        return {"built": False, "error": _IMPORT_ERROR}
    return {"built": True, **_C.build_info()}


def svdq_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    smooth: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    unsigned_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ lora_down) @ lora_up^T + bias, x [M, K]."""
    act_codes, act_scales = numerics.quantize_activations(x, smooth, shift, unsigned_groups)
    weight_codes = numerics.unpack_int4(qweight, signed=True)
    y = numerics.w4a4_gemm_reference(act_codes, act_scales, weight_codes, wscales)
    if lora_down.shape[1]:
        y += numerics.lowrank_reference(x, lora_down, lora_up)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


def _fallback_reason(x: torch.Tensor) -> str:
    """Why the compiled kernels cannot run on x ('' when they can)."""
    if x.device.type != "cuda":
        return f"no CUDA kernels for {x.device.type} tensors"
    if _C is None:
        return f"the extension is not built ({_IMPORT_ERROR}); run install.py"
    return "the extension has no W4A4 kernel for this GPU"


def svdq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """SVDQuant W4A4 linear on x [M, K] with an `SVDQLinear`'s tensors."""
    _announce_fallback(_fallback_reason(x))
    return svdq_linear_reference(
        x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
        layer.bias, layer.shift, layer.unsigned_groups,
    )


def w4a16_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """4-bit weight, 16-bit activation linear on x [M, K] with a `W4A16Linear`'s tensors."""
    codes = numerics.unpack_int4(layer.qweight, signed=False)
    weight = numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
