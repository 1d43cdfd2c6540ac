"""One dispatch point for the quantized linear ops.

Each op runs the compiled extension (`svdquant._C`) when it can run the case (built, has the
kernel, tensor on a GPU it was built for) and the PyTorch reference in `numerics` otherwise.
A fallback is announced with one log line per reason, never an error.
"""

from __future__ import annotations

import functools
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


# Power-of-two restricted activation scales (REFERENCE.md design (d), numerics.quantize_activations_pow2)
# for layers that do not set their own `pow2_activations`: False (default) = for none, so every model
# computes the reference engine's function; True = for every layer; None = exactly for the layers
# whose weights have power-of-two group scales (our Hopper format, where it enables the fast GEMM;
# detection alone cannot tell our format from a model whose scales happen to be powers of two).
# The reference path follows the same choice, so every device computes the same function.
pow2_activations: bool | None = False


def uses_pow2_activations(layer) -> bool:
    """Whether `layer`'s input is quantized with power-of-two restricted scales."""
    choice = getattr(layer, "pow2_activations", None)
    if choice is None:
        choice = pow2_activations
    return bool(getattr(layer, "pow2_weights", False)) if choice is None else bool(choice)


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
    pow2_activations: bool = False,
    gelu_from: int | None = None,
) -> torch.Tensor:
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ lora_down) @ lora_up^T + bias, x [M, K].

    pow2_activations: Q of the input is numerics.quantize_activations_pow2. gelu_from: output
    channels from this one on are GELU (tanh approximation) of the above, taken in float32 before
    the rounding to x's dtype, as kernel 2's epilogue does."""
    if pow2_activations:
        act_codes, atok, exps = numerics.quantize_activations_pow2(x, smooth, shift, unsigned_groups)
        act_scales = numerics.pow2_scales(atok, exps)
    else:
        act_codes, act_scales = numerics.quantize_activations(x, smooth, shift, unsigned_groups)
    weight_codes = numerics.unpack_int4(qweight, signed=True)
    y = numerics.w4a4_gemm_reference(act_codes, act_scales, weight_codes, wscales)
    if lora_down.shape[1]:
        y += numerics.lowrank_reference(x, lora_down, lora_up)
    if bias is not None:
        y += bias.float()
    return numerics.gelu_channels(y, gelu_from).to(x.dtype)


# ---- Hopper (sm_90a) W4A4 path -------------------------------------------------------------------
# Kernel 1 (csrc/sm90/act_quant.cu) quantizes x and computes x @ lora_down in one pass; kernel 2
# runs the W4A4 GEMM and adds the low-rank up projection and the bias in its epilogue:
# csrc/sm90/w4a4_gemm.cu (exact path, any weight scales, FP8 tensor cores, one rescaling per
# 64-group) or, for layers with power-of-two weight scales and activations,
# csrc/sm90/w4a4_gemm_pow2.cu (the scales' powers of two are folded into s8 operands, INT8 tensor
# cores sum all of K exactly; per-row and per-token factors applied once in the epilogue). Kernel 2
# reads the layer's qweight [N, K/2], wscales, lora_up and bias in their natural layout, so the
# weights stay one 4-bit copy on the GPU. Derived tensors, cached on the layer: fp32 copies of
# smooth and its reciprocal (2 x 4 bytes per input channel), the shift's one fp32 value per
# 64-group, lora_down reordered for kernel 1 (a second copy of it, 2 bytes per (input channel,
# rank), at ranks up to KERNEL1_MAX_RANK only), and for the fast path the weight scales' exponents
# (1 byte per group scale) and row bases.
_SM90_OPS = ("act_quant_sm90", "w4a4_gemm_sm90", "w4a4_gemm_pow2_sm90")


def sm90_kernels_built() -> bool:
    """Whether the extension holds the sm_90a W4A4 kernels."""
    return _C is not None and all(hasattr(_C, name) for name in _SM90_OPS)


@functools.lru_cache(maxsize=None)
def _capability_of_index(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of_index(device.index if device.index is not None else torch.cuda.current_device())


def _fallback_reason(x: torch.Tensor, layer) -> str:
    """Why the compiled kernels cannot run this call ('' when they can)."""
    if x.device.type != "cuda":
        return f"no CUDA kernels for {x.device.type} tensors"
    if _C is None:
        return f"the extension is not built ({_IMPORT_ERROR}); run install.py"
    if not sm90_kernels_built():
        return "the extension was built without the sm_90a W4A4 kernels"
    major, minor = _capability(x.device)
    if (major, minor) != (9, 0):
        return f"no W4A4 kernel for sm_{major}{minor} GPUs yet"
    if x.dtype not in numerics.SUPPORTED_DTYPES or x.dtype != layer.wscales.dtype:
        return f"input dtype {x.dtype} with {layer.wscales.dtype} weights (the kernels need one of bf16/fp16 for both)"
    if layer.out_features % 8:
        return f"out_features {layer.out_features} is not a multiple of 8"
    if layer.qweight.device != x.device:
        return f"weights on {layer.qweight.device}, input on {x.device}"
    if layer.shift is not None and _sm90_layer_inputs(layer)[2] is None:
        return "the input shift varies inside a 64-channel group (the kernels take one shift per group)"
    return ""


def lora_down_sm90(lora_down: torch.Tensor) -> torch.Tensor:
    """lora_down [K, r] in kernel 1's layout [r, K]: each 64-group's columns reordered so that an
    mma lane's B fragments of the group are 32 contiguous bytes (act_quant.cu):
    out[n, 64 g + 16 q + 4 s + 2 h + e] = lora_down[64 g + 16 s + 8 h + 2 q + e, n]."""
    k, r = lora_down.shape
    # [n, g, s, h, q, e] -> [n, g, q, s, h, e]
    grouped = lora_down.t().reshape(r, k // 64, 4, 2, 4, 2)
    return grouped.permute(0, 1, 4, 2, 3, 5).reshape(r, k).contiguous()


def _cached_on(layer, attr: str, key: tuple, compute):
    """compute(), kept on the layer as `attr` until `key` (its source tensors' storage and version)
    changes: LoRAs and loads replace a layer's tensors, in-place edits bump their versions."""
    cached = getattr(layer, attr, None)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        setattr(layer, attr, cached)
    return cached[1]


# Kernel 1 computes the low-rank down projection in its pass over x up to this rank (a model's own
# branch). Beyond it (LoRAs joined to the branch) one cuBLAS GEMM x @ lora_down over all ranks costs
# less than kernel 1's further rank blocks, which it can compute (ranks up to 1024) but at ~0.5 us
# (K = 3072) to ~1.4 us (K = 12288) per rank at M = 4608, against 12-15 / 46-54 us for the whole
# GEMM at ranks 32-224 (bench/NOTES.md); at rank 32 the two ways cost the same.
KERNEL1_MAX_RANK = 32


def _lowrank_in_kernel1(layer) -> bool:
    return layer.lora_down.shape[1] <= KERNEL1_MAX_RANK


def group_shifts(shift: torch.Tensor) -> torch.Tensor | None:
    """A layer's input shift [K] as kernel 1 takes it: one fp32 value per 64-group, or None where
    the values inside a group differ (no producer of ours makes such a layer: the GELU shift covers
    whole groups with one value)."""
    grouped = shift.float().reshape(-1, numerics.GROUP_SIZE)
    return grouped[:, 0].contiguous() if bool((grouped == grouped[:, :1]).all()) else None


def _sm90_layer_inputs(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Kernel 1's per-layer inputs, cached on the layer: fp32 smooth, 1/smooth (correctly rounded),
    the shift per group (group_shifts), and lora_down in its layout (lora_down_sm90), or no ranks
    ([0, K]) above KERNEL1_MAX_RANK, where svdq_linear_sm90 computes the low-rank input with cuBLAS."""
    shift, down = layer.shift, layer.lora_down
    key = (layer.smooth.data_ptr(), layer.smooth._version, down.data_ptr(), down._version, tuple(down.shape),
           None if shift is None else (shift.data_ptr(), shift._version))

    def compute():
        smooth = layer.smooth.float().contiguous()
        fused_rank = down.shape[1] if _lowrank_in_kernel1(layer) else 0
        return (smooth, torch.reciprocal(smooth), None if shift is None else group_shifts(shift),
                lora_down_sm90(down[:, :fused_rank]))

    return _cached_on(layer, "_sm90_inputs", key, compute)


def _sm90_pow2_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path's weight-scale exponents (uint8 [K/64, round_up(N, 16)], rows padded for TMA)
    and row bases (fp32 [N]), cached on the layer."""

    def compute():
        wbase, exps = numerics.pow2_weight_exponents(layer.wscales)
        groups, n = exps.shape
        padded = torch.zeros(groups, (n + 15) // 16 * 16, dtype=torch.uint8, device=exps.device)
        padded[:, :n] = exps
        return padded, wbase.contiguous()

    return _cached_on(layer, "_sm90_pow2", (layer.wscales.data_ptr(), layer.wscales._version), compute)


def act_operands_sm90_to_natural(codes: torch.Tensor, int8_operands: bool = False) -> torch.Tensor:
    """Kernel 1's codes (e4m3 bytes, or with int8_operands the fast kernel's s8 bytes of
    code * 2^(3 - e); k permuted inside each 64-group) -> their values in natural order, float32
    [M, K] (the INT4 codes; code * 2^-e in pow2 mode).

    Stored byte p of a group holds natural column perm(p), with
    perm(32 s + 16 h + 4 q + j) = 16 q + 8 s + 4 h + j (act_quant.cu explains why).
    """
    m, k = codes.shape
    p = torch.arange(64, device=codes.device)
    perm = 16 * ((p // 4) % 4) + 8 * (p // 32) + 4 * ((p // 16) % 2) + p % 4
    if int8_operands:
        values = codes.view(torch.int8).float() * 2.0 ** -numerics.POW2_ACT_MAX_EXP
    else:
        values = codes.view(torch.float8_e4m3fn).float()
    values = values.reshape(m, k // 64, 64)
    natural = torch.empty_like(values)
    natural[..., perm] = values
    return natural.reshape(m, k)


def svdq_linear_sm90(x: torch.Tensor, layer, out: torch.Tensor | None = None) -> torch.Tensor:
    """The two Hopper kernels on x [M, K] (no checks beyond the extension's own: see svdq_linear)."""
    pow2 = uses_pow2_activations(layer)
    fast = pow2 and layer.pow2_weights
    x = x.contiguous()
    # pow2 mode: ascales is [1, m_al], each token's scale atok, the 2^-e being in the codes
    codes, ascales, lora_act = _C.act_quant_sm90(x, *_sm90_layer_inputs(layer), pow2, fast)
    if not _lowrank_in_kernel1(layer):
        lora_act = x @ layer.lora_down
    gelu_from = -1 if layer.gelu_from is None else layer.gelu_from
    if fast:
        wexp, wbase = _sm90_pow2_weights(layer)
        return _C.w4a4_gemm_pow2_sm90(codes, ascales, lora_act, layer.qweight.contiguous(), wexp, wbase,
                                      layer.lora_up.contiguous(), layer.bias, out, gelu_from=gelu_from)
    return _C.w4a4_gemm_sm90(codes, ascales, lora_act, layer.qweight.contiguous(), layer.wscales.contiguous(),
                             layer.lora_up.contiguous(), layer.bias, out, gelu_from)


def svdq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """SVDQuant W4A4 linear on x [M, K] with an `SVDQLinear`'s tensors."""
    reason = _fallback_reason(x, layer)
    if not reason:
        return svdq_linear_sm90(x, layer)
    _announce_fallback(reason)
    return svdq_linear_reference(
        x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
        layer.bias, layer.shift, layer.unsigned_groups, uses_pow2_activations(layer), layer.gelu_from,
    )


# The W4A16 GEMV kernel (csrc/generic/w4a16_gemv.cu) takes up to this many rows of x; more rows
# (no FLUX layer has them: the modulation linears see one row per image) dequantize W and use a GEMM.
GEMV_MAX_ROWS = 8


@functools.lru_cache(maxsize=None)
def _built_archs() -> tuple[tuple[int, int, bool], ...]:
    """(major, minor, arch-specific) of each architecture the extension was compiled for."""
    if _C is None:
        return ()
    archs = []
    for arch in _C.build_info()["archs"].split():
        major, minor = arch.rstrip("a").split(".")
        archs.append((int(major), int(minor), arch.endswith("a")))
    return tuple(archs)


def _runs_here(device: torch.device) -> bool:
    """Whether the extension holds machine code for this GPU (an sm_XY build runs on sm_XZ, Z >= Y;
    an arch-specific sm_XYa build only on sm_XY)."""
    major, minor = _capability(device)
    return any(major == a and (minor == b if specific else minor >= b) for a, b, specific in _built_archs())


def _gemv_fallback_reason(x: torch.Tensor, layer) -> str:
    """Why the W4A16 GEMV kernel cannot run this call ('' when it can)."""
    if _C is None:
        return f"the extension is not built ({_IMPORT_ERROR}); run install.py"
    if not hasattr(_C, "w4a16_gemv") or not _runs_here(x.device):
        return "the extension was built without a W4A16 kernel for sm_%d%d GPUs" % _capability(x.device)
    if x.dtype not in numerics.SUPPORTED_DTYPES or not (x.dtype == layer.wscales.dtype == layer.wzeros.dtype):
        return f"input dtype {x.dtype} with {layer.wscales.dtype} scales (the W4A16 kernel needs one of bf16/fp16 for both)"
    if layer.qweight.device != x.device:
        return f"weights on {layer.qweight.device}, input on {x.device}"
    return ""


def w4a16_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """4-bit weight, 16-bit activation linear on x [M, K] with a `W4A16Linear`'s tensors: the GEMV
    kernel for up to GEMV_MAX_ROWS rows on a GPU, else W dequantized to x's dtype and a GEMM (the
    dequantization by a kernel on a GPU: the reference path's W bit for bit, in one pass)."""
    if x.device.type == "cuda" and 0 < x.shape[0] <= GEMV_MAX_ROWS:
        reason = _gemv_fallback_reason(x, layer)
        if not reason:
            bias = None if layer.bias is None else layer.bias.to(x.dtype)
            return _C.w4a16_gemv(x.contiguous(), layer.qweight.contiguous(), layer.wscales.contiguous(),
                                 layer.wzeros.contiguous(), bias)
        _announce_fallback(reason)
    elif x.device.type == "cuda" and _dequant_runs(x, layer):
        weight = torch.empty(layer.out_features, layer.in_features, dtype=x.dtype, device=x.device)
        _C.w4a16_dequant(layer.qweight.contiguous(), layer.wscales.contiguous(), layer.wzeros.contiguous(), weight)
        return torch.nn.functional.linear(x, weight, None if layer.bias is None else layer.bias.to(x.dtype))
    return w4a16_linear_reference(x, layer)


def _dequant_runs(x: torch.Tensor, layer) -> bool:
    """Whether the dequantization kernel can make W for this call (else the PyTorch reference does)."""
    return (_C is not None and hasattr(_C, "w4a16_dequant") and _runs_here(x.device)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and layer.wscales.dtype in numerics.SUPPORTED_DTYPES and layer.wzeros.dtype == layer.wscales.dtype
            and layer.qweight.device == x.device)


def w4a16_linear_reference(x: torch.Tensor, layer) -> torch.Tensor:
    """W dequantized to x's dtype (numerics.dequantize_w4a16), then one GEMM."""
    codes = numerics.unpack_int4(layer.qweight, signed=False)
    weight = numerics.dequantize_w4a16(codes, layer.wscales, layer.wzeros).to(x.dtype)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)
