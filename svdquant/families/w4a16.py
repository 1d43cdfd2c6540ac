"""Host side of the W4A16 kernels (csrc/generic, any sm_80+ GPU): the GEMV for a few rows of x
(w4a16_gemv.cu) and the weight dequantization for a GEMM over many rows (w4a16_dequant.cu)."""

from __future__ import annotations

import torch

from .. import cuda, numerics
from . import aligned16, check_half, check_tensor

FAMILY = "w4a16"

# The GEMV kernel takes up to this many rows of x, in buckets of 1, 2, 4 and 8 rows (one kernel
# instantiation each); more rows (no FLUX layer has them: the modulation linears see one row per
# image) dequantize W and use a GEMM.
GEMV_MAX_ROWS = 8
_ROW_BUCKETS = (1, 2, 4, 8)
_GEMV_THREADS = 128
_DEQUANT_THREADS = 256
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

KERNELS = tuple(f"w4a16_gemv_{d}_m{b}" for d in ("bf16", "fp16") for b in _ROW_BUCKETS) + tuple(
    f"w4a16_dequant_{s}_to_{o}" for s in ("bf16", "fp16") for o in ("bf16", "fp16", "fp32"))



def gemv(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
         bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T + bias for M <= GEMV_MAX_ROWS, W[n, k] = code * wscales[g, n] + wzeros[g, n]."""
    if not (x.is_cuda and x.dim() == 2 and qweight.dim() == 2):
        raise RuntimeError("x must be a 2-D CUDA tensor, qweight 2-D")
    check_half(x, "x")
    (m, k), n = x.shape, qweight.shape[0]
    if k % 64:
        raise RuntimeError(f"the input width {k} is not a multiple of 64")
    if not 1 <= m <= GEMV_MAX_ROWS:
        raise RuntimeError(f"w4a16_gemv takes 1 to {GEMV_MAX_ROWS} rows, got {m}")
    check_tensor(x, x, "x", x.dtype, (m, k))
    check_tensor(qweight, x, "qweight", torch.uint8, (n, k // 2))
    check_tensor(wscales, x, "wscales", x.dtype, (k // 64, n))
    check_tensor(wzeros, x, "wzeros", x.dtype, (k // 64, n))
    if bias is not None:
        check_tensor(bias, x, "bias", x.dtype, (n,))
    if not aligned16(x, qweight):
        raise RuntimeError("w4a16_gemv: x and qweight must start on a 16-byte boundary")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    bucket = next(b for b in _ROW_BUCKETS if m <= b)
    rows_per_cta = 4 if bucket <= 2 else 2
    fn = cuda.function(FAMILY, f"w4a16_gemv_{_NAMES[x.dtype]}_m{bucket}", x.device)
    fn.launch((n + rows_per_cta - 1) // rows_per_cta, _GEMV_THREADS, (x, qweight, wscales, wzeros, bias, y, m, n, k))
    return y


def dequant(qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [N, K] (bf16, fp16 or fp32) = code * wscales[g, n] + wzeros[g, n] in fp32, rounded once
    (numerics.dequantize_w4a16(...).to(out.dtype) bit for bit)."""
    if not (qweight.is_cuda and qweight.dim() == 2):
        raise RuntimeError("qweight must be a 2-D CUDA tensor")
    check_half(wscales, "wscales")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if k % 64:
        raise RuntimeError(f"the input width {k} is not a multiple of 64")
    if out.dtype not in _NAMES:
        raise RuntimeError("out must be bfloat16, float16 or float32")
    check_tensor(qweight, qweight, "qweight", torch.uint8, (n, k // 2))
    check_tensor(wscales, qweight, "wscales", wscales.dtype, (k // 64, n))
    check_tensor(wzeros, qweight, "wzeros", wscales.dtype, (k // 64, n))
    check_tensor(out, qweight, "out", out.dtype, (n, k))
    if n == 0 or k == 0:
        return out
    if not aligned16(qweight, out):
        raise RuntimeError("w4a16_dequant: qweight and w must start on a 16-byte boundary")
    fn = cuda.function(FAMILY, f"w4a16_dequant_{_NAMES[wscales.dtype]}_to_{_NAMES[out.dtype]}", qweight.device)
    words = n * (k // 8)
    fn.launch((words + _DEQUANT_THREADS - 1) // _DEQUANT_THREADS, _DEQUANT_THREADS, (qweight, wscales, wzeros, out, n, k))
    return out


def unsupported_reason(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor) -> str:
    """Why the GEMV cannot run this call of a W4A16 linear ('' when it can)."""
    if x.dtype not in numerics.SUPPORTED_DTYPES or not (x.dtype == wscales.dtype == wzeros.dtype):
        return (f"input dtype {x.dtype} with {wscales.dtype} scales "
                "(the W4A16 kernel needs one of bf16/fp16 for both)")
    if qweight.device != x.device:
        return f"weights on {qweight.device}, input on {x.device}"
    return ""


def dequant_runs(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor) -> bool:
    """Whether the dequantization kernel can make W for this call of a W4A16 linear."""
    return (x.dtype in _NAMES and wscales.dtype in numerics.SUPPORTED_DTYPES
            and wzeros.dtype == wscales.dtype and qweight.device == x.device)


def linear(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """A W4A16 linear on x [M, K] (a CUDA tensor the kernels take: unsupported_reason / dequant_runs):
    the GEMV for up to GEMV_MAX_ROWS rows, else W dequantized to x's dtype and one GEMM."""
    bias = None if bias is None else bias.to(x.dtype)
    qweight, wscales, wzeros = qweight.contiguous(), wscales.contiguous(), wzeros.contiguous()
    if 0 < x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x.contiguous(), qweight, wscales, wzeros, bias)
    weight = torch.empty(qweight.shape[0], qweight.shape[1] * 2, dtype=x.dtype, device=x.device)
    dequant(qweight, wscales, wzeros, weight)
    return torch.nn.functional.linear(x, weight, bias)
