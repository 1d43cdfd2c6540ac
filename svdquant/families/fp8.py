"""Host side of FP8 execution (csrc/fp8, Hopper; docs/DESIGN.md#fp8-execution): a W4A4 layer run on FP8
tensor cores. Its product and its own low-rank branch merged into one e4m3 weight matrix with a scale
per output channel (numerics.fp8_weights, made when the layer moves to the GPU or at its first call there, kept by its W4A4Kernel),
the input quantized per token by fp8_act_quant.cu, the GEMM by cuBLAS (torch._scaled_mm with row-wise
scales and the bias); LoRA columns joined to the branch after the model's own stay a 16-bit side branch."""

from __future__ import annotations

import torch

from .. import cuda, kernels, numerics
from . import aligned16, check_tensor

FAMILY = "fp8"
_THREADS = 256
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
KERNELS = tuple(f"fp8_act_quant_{d}" for d in _NAMES.values())


def act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """numerics.quantize_fp8_per_token of x [M, K] (bf16/fp16, K a multiple of 8) on the GPU:
    (codes float8_e4m3fn [M, K], scales float32 [M, 1])."""
    if not (x.is_cuda and x.dim() == 2) or x.dtype not in _NAMES:
        raise RuntimeError("x must be a 2-D bfloat16 or float16 CUDA tensor")
    m, k = x.shape
    if k % 8:
        raise RuntimeError(f"the input width {k} is not a multiple of 8")
    check_tensor(x, x, "x", x.dtype, (m, k))
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if not aligned16(x, codes):
        raise RuntimeError("fp8_act_quant: x and codes must start on a 16-byte boundary")
    if m and k:
        fn = cuda.function(FAMILY, f"fp8_act_quant_{_NAMES[x.dtype]}", x.device)
        fn.launch(m, _THREADS, (x, codes, scales, m, k))
    else:
        scales.zero_()
    return codes, scales


def layer_unsupported_reason(dtype: torch.dtype, out_features: int) -> str:
    """Why FP8 execution cannot run a layer with out_features outputs on dtype inputs ('' when it can)."""
    if dtype != torch.bfloat16:
        return f"{dtype} activations (cuBLAS's FP8 GEMM with per-token scales writes bfloat16 only)"
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16"
    return ""


def unsupported_reason(x: torch.Tensor, kernel: kernels.W4A4Kernel) -> str:
    """Why FP8 execution cannot run this call ('' when it can)."""
    reason = layer_unsupported_reason(x.dtype, kernel.out_features)
    if not reason and kernel.qweight.device != x.device:
        reason = f"weights on {kernel.qweight.device}, input on {x.device}"
    return reason


def weights_bytes(in_features: int, out_features: int, bias: bool) -> int:
    """The memory `weights` keeps for a layer: e4m3 codes [N, K], float32 scales [N] and, for a layer with a
    bias or an input shift (bias: True), the bias in bfloat16 [N]."""
    return out_features * (in_features + 4 + (2 if bias else 0))


def weights(kernel: kernels.W4A4Kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The layer's e4m3 weights [N, K], their scales [1, N] (float32) and the bias in bfloat16 with the
    input shift's share (numerics.fp8_weights on the model's own branch columns), kept by `kernel`."""
    def compute():
        base = kernel.base_rank
        codes, scales, bias = numerics.fp8_weights(kernel.qweight, kernel.wscales, kernel.smooth,
                                                   kernel.lora_down[:, :base], kernel.lora_up[:, :base],
                                                   kernel.bias, kernel.shift, kernel.rotation)
        return codes, scales.view(1, -1), None if bias is None else bias.to(torch.bfloat16)
    return kernel.derived("fp8_weights", kernel.tensors(), compute)


def svdq_linear(x: torch.Tensor, kernel: kernels.W4A4Kernel) -> torch.Tensor:
    """FP8 execution of the layer on x [M, K] (a call W4A4Kernel routes here): numerics.fp8_linear_reference's
    function of x to cuBLAS's rounding, plus the LoRA columns past kernel.base_rank as a 16-bit branch."""
    x = x.contiguous()
    codes, scales, bias = weights(kernel)
    qx, sx = act_quant(x)
    y = torch._scaled_mm(qx, codes.t(), scale_a=sx, scale_b=scales, bias=bias, out_dtype=torch.bfloat16)
    base = kernel.base_rank
    if kernel.rank > base:
        y.addmm_(x @ kernel.lora_down[:, base:], kernel.lora_up[:, base:].t())
    if kernel.gelu_from is not None:
        torch.ops.aten.gelu_(y[:, kernel.gelu_from:], approximate="tanh")
    return y
