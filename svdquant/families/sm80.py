"""Host side of the sm80 W4A4 family (csrc/sm80, any sm_80 or newer GPU): kernel 1 (act_quant.cu,
activation quantization fused with the low-rank down projection) and kernel 2 (w4a4_gemm.cu, the
W4A4 GEMM with per-group promotion, the low-rank up projection, bias and the GELU epilogue), with
two tensor-core variants of kernel 2 on the same operands: "int4" (mma.sync m16n8k64 s4, native on
sm_80/86/89) and "int8" (mma.sync m16n8k32 s8 on the INT4 codes, any sm_80+ GPU). The int8 variant
runs layers with power-of-two weight scales and activations on w4a4_gemm_pow2.cu instead (the
scales' powers of two folded into s8 operands, all of K summed in int32, no per-group promotion),
after kernel 1 in its pow2_s8 mode. Kernel 1 takes a LayerNorm + modulation prologue (kernels.ModulatedNorm):
x is then the LayerNorm's input and the layer computes on norm.apply(x), which kernel 1 also writes out only at
ranks above kernels.KERNEL1_MAX_RANK (the low-rank input of cuBLAS's GEMM).

The kernels read the layer's tensors in their natural layout (qweight [N, K/2], wscales [K/64, N],
lora_up [N, r], bias), so the weights stay one 4-bit copy. Derived tensors, kept by the layer's
kernels.W4A4Kernel until their sources change: fp32 copies of smooth and its reciprocal (2 x 4 bytes
per input channel), the shift's one fp32 value per 64-group, lora_down transposed for kernel 1
([r, K], a second copy of it at ranks up to kernels.KERNEL1_MAX_RANK only), only where the rank is
not a multiple of 16, lora_up with zero columns up to the next multiple, and for the whole-K kernel
the weight scales' exponents (1 byte per group scale) and row bases.
"""

from __future__ import annotations

import functools

import torch

from .. import cuda, kernels, numerics
from . import check_concat, check_tensor, kernel1_operands, norm_arguments, residual_arguments, sm_count

FAMILY = "sm80"
MMA_VARIANTS = ("int4", "int8")
# kernel 1 takes a LayerNorm + modulation prologue (kernels.ModulatedNorm, act_quant's `norm`)
KERNEL1_NORM = True
KERNEL1_CONCAT = True  # kernel 1 reads a kernels.Concat's two parts where they are
KERNEL2_RESIDUAL = True  # both kernel 2s add their output into a kernels.GatedResidual in the epilogue
# Kernel 1 computes x @ lora_down in its pass over x (one warp per 8 ranks) up to kernels.KERNEL1_MAX_RANK;
# kernel 2's low-rank stages take kernels.RANK_MULTIPLE ranks each.
_ACT_TOKENS = 16  # tokens per kernel 1 CTA
_ACT_THREADS = 256  # act_quant.cu's kThreads: two halves of 128, each quantizing one group of a pair
_GEMM_TILE = 128  # tokens and channels per kernel 2 CTA
_GEMM_THREADS = 128
# the whole-K kernel 2's CTA tile (tokens, channels), ring depth and warp tile (tokens): w4a4_gemm_pow2.cu's kTileM,
# kTileN, kStages, kWarpM
_POW2_TILE_M, _POW2_TILE_N, _POW2_STAGES, _POW2_WARP_M = 128, 128, 3, 128
_POW2_THREADS = _POW2_TILE_M // _POW2_WARP_M * _POW2_TILE_N  # warps of _POW2_WARP_M tokens x 32 channels
_POW2_SMEM = _POW2_STAGES * (_POW2_TILE_M * 64 + _POW2_TILE_N * 33)  # kStages * kStageBytes
# CTAs per SM: the kernel's launch bounds (kMinBlocks: 8 warps of 128-token tiles at 255 registers, 16 of 64-token)
_POW2_CTAS_PER_SM = (8 if _POW2_WARP_M == 128 else 16) * 32 // _POW2_THREADS
# Stream-K for the last wave (w4a4_gemm_pow2.cu's work split): at most STREAM_K_MAX_SPLITS K-slices per tile (the
# tile's last CTA reads the others' 64 KB of int32 sums one slice after another), at least
# STREAM_K_MIN_SLICE_GROUPS groups per slice (each slice fills and drains the copy ring once)
STREAM_K_MAX_SPLITS = 4
STREAM_K_MIN_SLICE_GROUPS = 4
# the kernel's counters (kMaxStreamKTiles): stream-K tiles of one launch at most
STREAM_K_MAX_TILES = 4096
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

# kernel 1's entry points: none or the Hadamard rotation, and (_coefficients) any rotation by its coefficients
KERNELS = tuple(f"act_quant_{mode}_{d}{path}" for mode in ("exact", "pow2", "pow2_s8") for d in ("bf16", "fp16")
                for path in ("", "_coefficients")) + tuple(
    f"w4a4_gemm_{mma}_{d}" for mma in MMA_VARIANTS + ("pow2_int8",) for d in ("bf16", "fp16"))
# the whole-K kernel's int32 sums stay exact up to this K (|product| <= 120 * 128 of the s8 operands)
POW2_MAX_K = 131072


class Sm80InputError(ValueError):
    """Inputs the sm80 kernels cannot take (the message names the tensor and what is wrong)."""


# the kernels read every tensor with 16-byte vector loads
_check = functools.partial(check_tensor, error=Sm80InputError, align=16)


def _padded_rank(rank: int) -> int:
    return (rank + kernels.RANK_MULTIPLE - 1) // kernels.RANK_MULTIPLE * kernels.RANK_MULTIPLE


def scales_rows(m: int) -> int:
    """m_al: the row length of kernel 1's ascales [K/64, m_al] (M rounded up to a multiple of 4)."""
    return (m + 3) // 4 * 4


def act_quant(x: torch.Tensor, smooth: torch.Tensor, inv_smooth: torch.Tensor, group_shift: torch.Tensor | None,
              lora_t: torch.Tensor | None, pow2: bool = False, int8_operands: bool = False,
              rotation: tuple[int, torch.Tensor | None] = (kernels.ROTATION_NONE, None),
              norm: kernels.ModulatedNorm | None = None, norm_out: torch.Tensor | None = None,
              x2: torch.Tensor | None = None):
    """Kernel 1 on x [M, K] (bf16/fp16). smooth, inv_smooth: fp32 [K] (inv_smooth = 1/smooth correctly
    rounded); group_shift: fp32 [K/64] (kernels.group_shifts) or None; lora_t: lora_down^T [r, K] in x's
    dtype, r a multiple of 16 up to kernels.KERNEL1_MAX_RANK, or None. int8_operands (pow2 only):
    the whole-K kernel 2's s8 operands (the pow2_s8 entry points). rotation: the layer's group
    rotation as kernels.kernel1_rotation gives it (W4A4Kernel.kernel1_rotation): (kind, coefficients
    or None). norm: x is a LayerNorm's input and kernel 1 quantizes norm.apply(x) (the norm prologue;
    mult and add [B, K] or [B, 1, K] in x's dtype, M a multiple of B), also storing it into norm_out [M, K]
    (x's dtype) where given. x2: kernel 1 quantizes the concatenation of x [M, K1] and x2 [M, K2] along K (K1 a
    multiple of 64), reading each where it is (unit column stride, 16-byte aligned rows), never with a norm.

    Returns (codes, ascales, lora_act [M, r] in x's dtype or None): codes uint8 [M, K/2] packed as
    numerics.pack_int4 and ascales fp32 [K/64, m_al] (pow2 mode: each token's atok * 2^-e); with
    int8_operands, codes [M, K] the s8 bytes code * 2^(3 - e) in act_quant.cu's slot order and
    ascales [1, m_al] each token's atok."""
    if not (x.is_cuda and x.dim() == 2):
        raise Sm80InputError("x must be a 2-D CUDA tensor")
    if x.dtype not in _NAMES:
        raise Sm80InputError(f"x must be bfloat16 or float16, got {x.dtype}")
    if int8_operands and not pow2:
        raise Sm80InputError("int8_operands needs pow2 activation scales")
    m, k = x.shape[0], check_concat(x, x2, norm, error=Sm80InputError)
    if k % numerics.GROUP_SIZE or k == 0:
        raise Sm80InputError(f"the input width {k} is not a positive multiple of {numerics.GROUP_SIZE}")
    groups = k // numerics.GROUP_SIZE
    _check(smooth, x, "smooth", torch.float32, (k,))
    _check(inv_smooth, x, "inv_smooth", torch.float32, (k,))
    if group_shift is not None:
        _check(group_shift, x, "group_shift", torch.float32, (groups,))
    rotation_passes, coef_shape = kernels.kernel1_rotation_passes(rotation, Sm80InputError)
    rotation_kind, rotation_coef = rotation
    if coef_shape is not None:
        _check(rotation_coef, x, "rotation coefficients", torch.float32, coef_shape)
    rank = 0 if lora_t is None else lora_t.shape[0]
    if lora_t is not None:
        if rank % kernels.RANK_MULTIPLE or rank > kernels.KERNEL1_MAX_RANK:
            raise Sm80InputError(f"kernel 1 takes ranks that are multiples of {kernels.RANK_MULTIPLE} up to "
                                 f"{kernels.KERNEL1_MAX_RANK}, got {rank}")
        _check(lora_t, x, "lora_t", x.dtype, (rank, k))
    norm_args = norm_arguments(norm, norm_out, x, error=Sm80InputError)
    m_al = scales_rows(m)
    codes = torch.empty(m, k if int8_operands else k // 2, dtype=torch.uint8, device=x.device)
    ascales = torch.empty(1 if int8_operands else groups, m_al, dtype=torch.float32, device=x.device)
    lora_act = torch.empty(m, rank, dtype=x.dtype, device=x.device) if rank else None
    if m:
        mode = "pow2_s8" if int8_operands else "pow2" if pow2 else "exact"
        path = "_coefficients" if rotation_kind == kernels.ROTATION_COEFFICIENTS else ""
        fn = cuda.function(FAMILY, f"act_quant_{mode}_{_NAMES[x.dtype]}{path}", x.device)
        fn.launch((m + _ACT_TOKENS - 1) // _ACT_TOKENS, _ACT_THREADS,
                  (x, x.stride(0), *((x, x.stride(0)) if x2 is None else (x2, x2.stride(0))),
                   x.shape[1] // numerics.GROUP_SIZE, smooth, inv_smooth, group_shift, rotation_passes, rotation_coef,
                   lora_t if rank else None, codes, ascales, lora_act, m, k, rank, m_al, *norm_args))
    return codes, ascales, lora_act


def _epilogue_operands(codes: torch.Tensor, m: int, n: int, dtype: torch.dtype, lora_act: torch.Tensor | None,
                       lora_up: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor | None,
                       residual: kernels.GatedResidual | None) -> tuple[int, torch.Tensor, tuple]:
    """Both kernel 2s' checks of the low-rank operands, bias, out and the gated residual; returns (rank, out, the
    residual's kernel arguments: families.residual_arguments), out made where None."""
    if (lora_act is None) != (lora_up is None):
        raise Sm80InputError("lora_act and lora_up must be given together")
    rank = 0 if lora_act is None else lora_act.shape[1]
    if lora_act is not None:
        if rank % kernels.RANK_MULTIPLE:
            raise Sm80InputError(f"the rank {rank} is not a multiple of {kernels.RANK_MULTIPLE}")
        _check(lora_act, codes, "lora_act", dtype, (m, rank))
        _check(lora_up, codes, "lora_up", dtype, (n, rank))
    if bias is not None:
        _check(bias, codes, "bias", dtype, (n,))
    if out is None:
        out = torch.empty(m, n, dtype=dtype, device=codes.device)
    else:
        _check(out, codes, "out", dtype, (m, n))
    return rank, out, residual_arguments(residual, out, error=Sm80InputError)


def w4a4_gemm(codes: torch.Tensor, ascales: torch.Tensor, group_shift: torch.Tensor | None, qweight: torch.Tensor,
              wscales: torch.Tensor, lora_act: torch.Tensor | None, lora_up: torch.Tensor | None,
              bias: torch.Tensor | None = None, out: torch.Tensor | None = None, gelu_from: int | None = None,
              mma: str = "int8", residual: kernels.GatedResidual | None = None) -> torch.Tensor:
    """Kernel 2: y [M, N] = sum_g ascales[g, m] * wscales[g, n] * (codes . qweight over group g)
    + lora_act @ lora_up^T + bias, GELU (tanh) on channels >= gelu_from, in wscales' dtype; with a
    residual, residual + gate * y instead (out may be the residual's tensor: in place).

    codes, ascales: kernel 1's; group_shift: as given to kernel 1 (its positive groups hold unsigned
    codes); qweight uint8 [N, K/2]; wscales [K/64, N] bf16/fp16; lora_act [M, r] and lora_up [N, r]
    (r a multiple of 16) or both None; out: [M, N] to write into, or None."""
    if mma not in MMA_VARIANTS:
        raise Sm80InputError(f"mma must be one of {MMA_VARIANTS}, got {mma!r}")
    if not (codes.is_cuda and codes.dim() == 2 and qweight.dim() == 2 and wscales.dim() == 2):
        raise Sm80InputError("codes must be a 2-D CUDA tensor, qweight and wscales 2-D")
    dtype = wscales.dtype
    if dtype not in _NAMES:
        raise Sm80InputError(f"wscales must be bfloat16 or float16, got {dtype}")
    m, half_k = codes.shape
    n, k = qweight.shape[0], 2 * half_k
    if k % numerics.GROUP_SIZE or k == 0:
        raise Sm80InputError(f"the input width {k} is not a positive multiple of {numerics.GROUP_SIZE}")
    if n % 8:
        raise Sm80InputError(f"the output width {n} is not a multiple of 8")
    groups, m_al = k // numerics.GROUP_SIZE, scales_rows(m)
    _check(codes, codes, "codes", torch.uint8, (m, half_k))
    _check(ascales, codes, "ascales", torch.float32, (groups, m_al))
    if group_shift is not None:
        _check(group_shift, codes, "group_shift", torch.float32, (groups,))
    _check(qweight, codes, "qweight", torch.uint8, (n, half_k))
    _check(wscales, codes, "wscales", dtype, (groups, n))
    rank, out, gated = _epilogue_operands(codes, m, n, dtype, lora_act, lora_up, bias, out, residual)
    if m and n:
        fn = cuda.function(FAMILY, f"w4a4_gemm_{mma}_{_NAMES[dtype]}", codes.device)
        grid = ((m + _GEMM_TILE - 1) // _GEMM_TILE, (n + _GEMM_TILE - 1) // _GEMM_TILE)
        fn.launch(grid, _GEMM_THREADS,
                  (codes, ascales, group_shift, qweight, wscales, lora_act if rank else None,
                   lora_up if rank else None, bias, out, m, n, k, m_al, rank,
                   -1 if gelu_from is None else int(gelu_from), *gated))
    return out


def stream_k_plan(tiles: int, groups: int, slots: int, splits: int | None = None) -> tuple[int, int]:
    """The whole-K kernel's work split (dp_tiles, splits): tiles 0 .. dp_tiles - 1 run whole, one CTA
    each; each later tile is shared by `splits` CTAs along K (stream-K). The later tiles are those of
    the last wave: tiles % slots of them (all where tiles < slots); slots = SMs x CTAs per SM.

    splits None: as many as the last wave's tiles fill the slots with (slots // its tiles), at most
    STREAM_K_MAX_SPLITS and groups // STREAM_K_MIN_SLICE_GROUPS: stream-K where that is 2 or more,
    i.e. where the last wave is at most half full. An int forces that many (at most groups), over
    the last whole wave where tiles % slots == 0; 1: no stream-K. Without stream-K (also where the
    last wave has more than STREAM_K_MAX_TILES tiles): (tiles, 1)."""
    if tiles == 0:
        return 0, 1
    tail = tiles % slots or min(tiles, slots)
    if splits is None:
        splits = min(slots // tail, STREAM_K_MAX_SPLITS, groups // STREAM_K_MIN_SLICE_GROUPS)
    splits = min(splits, groups)
    if splits < 2 or tail > STREAM_K_MAX_TILES:
        return tiles, 1
    return tiles - tail, splits


def whole_k_work_split(m: int, n: int, k: int, device: torch.device,
                       stream_k: int | None = None) -> tuple[int, int, int]:
    """The whole-K kernel's (tiles, dp_tiles, splits) at M x N x K on device's GPU (stream_k_plan)."""
    tiles = (m + _POW2_TILE_M - 1) // _POW2_TILE_M * ((n + _POW2_TILE_N - 1) // _POW2_TILE_N)
    slots = sm_count(cuda.device_index(device)) * _POW2_CTAS_PER_SM
    return (tiles, *stream_k_plan(tiles, k // numerics.GROUP_SIZE, slots, stream_k))


def w4a4_gemm_pow2(codes: torch.Tensor, atok: torch.Tensor, qweight: torch.Tensor, wexp: torch.Tensor,
                   wbase: torch.Tensor, dtype: torch.dtype, lora_act: torch.Tensor | None,
                   lora_up: torch.Tensor | None, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   gelu_from: int | None = None, stream_k: int | None = None,
                   residual: kernels.GatedResidual | None = None) -> torch.Tensor:
    """The whole-K kernel 2 (w4a4_gemm_pow2.cu): y [M, N] = atok[m] * wbase[n] * 2^-7 * (codes . the
    weights' s8 operands over all of K) + lora_act @ lora_up^T + bias, GELU (tanh) on channels >=
    gelu_from, in dtype (bf16/fp16, also that of lora_act, lora_up and bias); with a residual,
    residual + gate * y instead (out may be the residual's tensor: in place).

    codes uint8 [M, K], atok fp32 [1, m_al]: kernel 1's in pow2_s8 mode; qweight uint8 [N, K/2];
    wexp uint8 [K/64, n_al] and wbase fp32 [N]: pow2_weight_operands; lora_act [M, r] and lora_up
    [N, r] (r a multiple of 16) or both None; out: [M, N] to write into, or None. stream_k: K-slices
    per tile of the last wave (stream_k_plan's splits: None chooses, 1 none, 2 or more forces them);
    the result is bit for bit the same either way (int32 sums). Stream-K takes a workspace of 64 KB
    per tile and slice but one (int32 partial sums, per call) and the kernel module's tile counters:
    two stream-K launches must not run at once on one GPU (on two streams)."""
    if not (codes.is_cuda and codes.dim() == 2 and qweight.dim() == 2 and wexp.dim() == 2):
        raise Sm80InputError("codes must be a 2-D CUDA tensor, qweight and wexp 2-D")
    if dtype not in _NAMES:
        raise Sm80InputError(f"dtype must be bfloat16 or float16, got {dtype}")
    m, k = codes.shape
    n = qweight.shape[0]
    if k % numerics.GROUP_SIZE or k == 0 or k > POW2_MAX_K:
        raise Sm80InputError(f"the input width {k} is not a positive multiple of {numerics.GROUP_SIZE} "
                             f"up to {POW2_MAX_K}")
    if n % 8:
        raise Sm80InputError(f"the output width {n} is not a multiple of 8")
    groups, n_al = k // numerics.GROUP_SIZE, wexp.shape[1]
    _check(codes, codes, "codes", torch.uint8, (m, k))
    _check(atok, codes, "atok", torch.float32, (1, scales_rows(m)))
    _check(qweight, codes, "qweight", torch.uint8, (n, k // 2))
    _check(wexp, codes, "wexp", torch.uint8, (groups, (n + 15) // 16 * 16))
    _check(wbase, codes, "wbase", torch.float32, (n,))
    if stream_k is not None and (isinstance(stream_k, bool) or not isinstance(stream_k, int) or stream_k < 1):
        raise Sm80InputError(f"stream_k must be None or a positive int, got {stream_k!r}")
    rank, out, gated = _epilogue_operands(codes, m, n, dtype, lora_act, lora_up, bias, out, residual)
    if m and n:
        fn = cuda.function(FAMILY, f"w4a4_gemm_pow2_int8_{_NAMES[dtype]}", codes.device)
        tiles, dp_tiles, splits = whole_k_work_split(m, n, k, codes.device, stream_k)
        sk_tiles = tiles - dp_tiles
        partials = torch.empty(sk_tiles * (splits - 1) * _POW2_TILE_M * _POW2_TILE_N, dtype=torch.int32,
                               device=codes.device) if sk_tiles else None
        fn.launch(dp_tiles + sk_tiles * splits, _POW2_THREADS,
                  (codes, atok, qweight, wexp, wbase, lora_act if rank else None, lora_up if rank else None, bias,
                   out, m, n, k, n_al, rank, -1 if gelu_from is None else int(gelu_from), *gated, dp_tiles, splits,
                   partials),
                  smem=_POW2_SMEM)
    return out


def int8_operands_to_natural(codes: torch.Tensor) -> torch.Tensor:
    """Kernel 1's s8 operands (pow2_s8 mode, [M, K] bytes in act_quant.cu's slot order) -> int8
    [M, K] in natural column order: byte 32 c + s of a group holds column 32 c + 2 s (s < 16) or
    32 c + 2 (s - 16) + 1."""
    m, k = codes.shape
    s = torch.arange(64, device=codes.device)
    half, slot = s // 32, s % 32
    column = 32 * half + torch.where(slot < 16, 2 * slot, 2 * (slot - 16) + 1)
    natural = torch.empty(m, k // 64, 64, dtype=torch.int8, device=codes.device)
    natural[..., column] = codes.view(torch.int8).reshape(m, k // 64, 64)
    return natural.reshape(m, k)


def pow2_weight_operands(kernel: kernels.W4A4Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-K kernel's weight-scale exponents (uint8 [K/64, N rounded up to 16], zero padding:
    16-byte copies) and row bases (fp32 [N]), kept by the kernel."""

    def compute():
        operands = numerics.pow2_weight_exponents(kernel.wscales)
        if operands is None:
            raise Sm80InputError("the weight scales are not power-of-two fractions of their rows' largest")
        wbase, exps = operands
        groups, n = exps.shape
        padded = torch.zeros(groups, (n + 15) // 16 * 16, dtype=torch.uint8, device=exps.device)
        padded[:, :n] = exps
        return padded, wbase.contiguous()

    return kernel.derived("sm80_pow2_weights", (kernel.wscales,), compute)


def kernel1_inputs(kernel: kernels.W4A4Kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor | None]:
    """Kernel 1's per-layer inputs, kept by the kernel: fp32 smooth, 1/smooth (correctly rounded),
    the shift per group (None without a shift) and lora_down^T [r16, K] (ranks padded to a multiple
    of 16 with zeros), or None where the rank is 0 or above kernels.KERNEL1_MAX_RANK (svdq_linear then
    computes the low-rank input with cuBLAS)."""
    smooth, down, shift = kernel.smooth, kernel.lora_down, kernel.shift

    def compute():
        smooth32 = smooth.float().contiguous()
        group_shift = kernel.group_shifts()
        if shift is not None and group_shift is None:
            raise Sm80InputError("the input shift varies inside a 64-channel group (the kernels take one per group)")
        rank = down.shape[1]
        lora_t = None
        if 0 < rank <= kernels.KERNEL1_MAX_RANK:
            lora_t = torch.zeros(_padded_rank(rank), down.shape[0], dtype=down.dtype, device=down.device)
            lora_t[:rank] = down.t()
        return smooth32, torch.reciprocal(smooth32), group_shift, lora_t

    return kernel.derived("sm80_kernel1_inputs", (smooth, down, shift), compute)


def padded_lora_up(kernel: kernels.W4A4Kernel) -> torch.Tensor | None:
    """lora_up [N, r16]: the kernel's own tensor where r is a multiple of 16, else a kept copy with
    zero columns up to the next multiple; None at rank 0."""
    up = kernel.lora_up
    rank = up.shape[1]
    if rank == 0:
        return None
    if rank % kernels.RANK_MULTIPLE == 0:
        return up.contiguous()
    return kernel.derived("sm80_lora_up", (up,),
                          lambda: torch.nn.functional.pad(up, (0, _padded_rank(rank) - rank)).contiguous())


def runs_whole_k(kernel: kernels.W4A4Kernel, mma: str, pow2_activations: bool) -> bool:
    """Whether svdq_linear runs the whole-K kernel 2: the int8 variant on a layer with power-of-two
    weight scales and activations, K within POW2_MAX_K."""
    return mma == "int8" and pow2_activations and kernel.pow2_weights and kernel.in_features <= POW2_MAX_K


def svdq_linear(x: torch.Tensor | kernels.Concat, kernel: kernels.W4A4Kernel, mma: str = "int8",
                pow2_activations: bool | None = None, out: torch.Tensor | None = None,
                norm: kernels.ModulatedNorm | None = None, residual: kernels.GatedResidual | None = None
                ) -> torch.Tensor:
    """W4A4Kernel.reference's function of x [M, K] on the two sm80 kernels (mma: "int4" or "int8" for
    kernel 2; int8 on power-of-two layers: the whole-K kernel 2), or of norm.apply(x) (kernel 1's norm
    prologue; above kernels.KERNEL1_MAX_RANK kernel 1 also stores that input for the low-rank GEMM); x a
    kernels.Concat: kernel 1 reads its parts where they are (KERNEL1_CONCAT); residual: residual + gate * y in
    kernel 2's epilogue (KERNEL2_RESIDUAL), into out where given (the residual's own tensor included).
    pow2_activations: quantize x with power-of-two restricted scales (numerics.quantize_activations_pow2);
    None: as the kernel's activation mode says."""
    if pow2_activations is None:
        pow2_activations = kernel.pow2_activations
    if x.dtype != kernel.wscales.dtype:
        raise Sm80InputError(f"input dtype {x.dtype} with {kernel.wscales.dtype} weights")
    rank = kernel.rank
    wide = rank > kernels.KERNEL1_MAX_RANK  # cuBLAS computes the low-rank input, from the layer's input
    x, second = kernel1_operands(x, wide)
    whole_k = runs_whole_k(kernel, mma, pow2_activations)
    smooth, inv_smooth, group_shift, lora_t = kernel1_inputs(kernel)
    normalized = torch.empty_like(x) if wide and norm is not None else None
    codes, ascales, lora_act = act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2_activations, whole_k,
                                         kernel.kernel1_rotation(), norm, normalized, second)
    if wide:
        lora_act = (x if normalized is None else normalized) @ kernel.lora_down
        if rank % kernels.RANK_MULTIPLE:
            lora_act = torch.nn.functional.pad(lora_act, (0, _padded_rank(rank) - rank))
        lora_act = lora_act.contiguous()
    if whole_k:
        wexp, wbase = pow2_weight_operands(kernel)
        return w4a4_gemm_pow2(codes, ascales, kernel.qweight.contiguous(), wexp, wbase, x.dtype, lora_act,
                              padded_lora_up(kernel), kernel.bias, out, kernel.gelu_from, residual=residual)
    return w4a4_gemm(codes, ascales, group_shift, kernel.qweight.contiguous(), kernel.wscales.contiguous(), lora_act,
                     padded_lora_up(kernel), kernel.bias, out, kernel.gelu_from, mma, residual)
