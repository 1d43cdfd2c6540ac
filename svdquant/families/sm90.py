"""Host side of the Hopper (sm_90a) W4A4 kernels in csrc/sm90, launched through svdquant.cuda.

Kernel 1 (act_quant.cu) quantizes x and computes x @ lora_down in one pass; kernel 2 runs the W4A4
GEMM and adds the low-rank up projection and the bias in its epilogue: w4a4_gemm.cu (exact path,
any weight scales, FP8 tensor cores, one rescaling per 64-group) or, for layers with power-of-two
weight scales and activations, w4a4_gemm_pow2.cu (the scales' powers of two are folded into s8
operands, INT8 tensor cores sum all of K exactly; per-row and per-token factors applied once in the
epilogue). Kernel 2 reads the layer's qweight [N, K/2], wscales, lora_up and bias in their natural
layout, so the weights stay one 4-bit copy on the GPU. Derived tensors, kept by the layer's
kernels.W4A4Kernel: fp32 copies of smooth and its reciprocal (2 x 4 bytes per input channel), the
shift's one fp32 value per 64-group, lora_down reordered for kernel 1 (a second copy of it, 2 bytes
per (input channel, rank), at ranks up to kernels.KERNEL1_MAX_RANK only), and for the fast path the
weight scales' exponents (1 byte per group scale) and row bases.

Everything the kernels need besides their device code is here: argument checks, the launch plans
(cluster sizes, token tiles, the persistent schedule), shared-memory sizes (the same arithmetic as
the .cu files' layouts) and the TMA descriptors.
"""

from __future__ import annotations

import functools

import torch

from .. import cuda, kernels, numerics
from . import (aligned16, check_concat, check_half, check_tensor, kernel1_operands, norm_arguments, residual_arguments,
               sm_count)

FAMILY = "sm90"
# kernel 1 takes a LayerNorm + modulation prologue (kernels.ModulatedNorm, act_quant's `norm`)
KERNEL1_NORM = True
KERNEL1_CONCAT = True  # kernel 1 reads a kernels.Concat's two parts where they are
KERNEL2_RESIDUAL = True  # kernel 2 adds its output into a kernels.GatedResidual in its epilogue

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}

KERNELS = (
    # kernel 1: none or the Hadamard rotation, and (_coefficients) any rotation by its coefficients
    tuple(f"act_quant_{mode}_{d}_tiles{t}{path}" for mode in ("exact", "pow2") for d in ("bf16", "fp16") for t in (1, 2)
          for path in ("", "_coefficients"))
    + tuple(f"w4a4_gemm_{s}_scales_{d}" for s in ("group", "token") for d in ("bf16", "fp16"))
    + tuple(f"w4a4_gemm_pow2_t{t}_{d}" for t in (128, 256) for d in ("bf16", "fp16"))
)

_SMEM_LIMIT = 227 * 1024  # dynamic shared memory of one CTA on sm_90


# ---- TMA descriptors -------------------------------------------------------------------------------

# A descriptor is a pure function of its arguments (address, sizes, box, swizzle), so equal arguments
# reuse one encoding: the weights' maps are made once per layer, the activations' whenever the
# allocator hands out a new address. A map of a rank-0 low-rank branch is never read by the kernels.
_UNUSED_MAP = cuda.TensorMap()


@functools.lru_cache(maxsize=4096)
def _encoded_map(data_type: int, address: int, cols: int, rows: int, row_bytes: int, box_cols: int, box_rows: int,
                 swizzle: int) -> cuda.TensorMap:
    return cuda.tensor_map(data_type, address, (cols, rows), (row_bytes,), (box_cols, box_rows), swizzle=swizzle,
                           l2_promotion=cuda.TENSOR_MAP_L2_PROMOTION_L2_256B)


def _map_2d(t: torch.Tensor, box_cols: int, box_rows: int,
            swizzle: int = cuda.TENSOR_MAP_SWIZZLE_NONE) -> cuda.TensorMap:
    """Map of a [rows, cols] tensor with unit column stride (rows may be strided) in tiles of [box_rows,
    box_cols]; out-of-bounds reads give 0."""
    rows, cols = t.shape
    return _encoded_map(cuda.TENSOR_MAP_DTYPES[t.dtype], t.data_ptr(), cols, rows, t.stride(0) * t.element_size(),
                        box_cols, box_rows, swizzle)


# ---- kernel 1: activation quantization + low-rank down (act_quant.cu) -------------------------------

_AQ_TOKENS = 32                      # tokens per cluster
_AQ_THREADS = 256
_AQ_X_BOX_BYTES = _AQ_TOKENS * 128   # one group of a CTA's x slice
_AQ_MAX_CLUSTER_CTAS = 16            # non-portable cluster size (H100: up to 16)
_AQ_TARGET_GROUPS_PER_CTA = 8        # 32 KB of x per CTA (bench/NOTES.md#v14: best of 4..24 at M = 4608, K = 3072)


def _act_quant_param_bytes(pow2: bool) -> int:
    """A group's parameters in shared memory: 1/smooth and, exact mode only, smooth (act_quant.cu)."""
    return 256 if pow2 else 512


def _act_quant_smem_bytes(gpc: int, rank_block: int, blocks: int, cs: int, param_bytes: int, norm: bool) -> int:
    """act_quant.cu smem_layout(...).total + 1024 (slack to align the base to 1024 bytes)."""
    pair_share = (_AQ_TOKENS * rank_block // 2 + cs - 1) // cs
    inbox = gpc * _AQ_X_BOX_BYTES + gpc * param_bytes
    need = inbox + (2 if blocks > 1 else 1) * cs * pair_share * 8
    tmax = need + gpc * _AQ_TOKENS * 4
    bars = tmax + _AQ_MAX_CLUSTER_CTAS * _AQ_TOKENS * 4
    shift = bars + gpc * 8
    if norm:  # the per-token statistics' inbox, [cs][32] pairs of doubles
        return _round_up(shift + gpc * 4, 16) + cs * _AQ_TOKENS * 16 + 1024
    return shift + gpc * 4 + 1024


@functools.lru_cache(maxsize=4096)
def make_plan(m: int, k: int, rank: int, param_bytes: int, max_cs: int, sms: int,
              norm: bool = False) -> tuple[int, int, int, int]:
    """(cluster size cs, groups per CTA, rank tiles per warp, shared memory) of a kernel-1 launch."""
    groups = k // 64
    token_blocks = ((m + 3) // 4 * 4 + _AQ_TOKENS - 1) // _AQ_TOKENS
    cs = min(max_cs, max(1, (groups + _AQ_TARGET_GROUPS_PER_CTA - 1) // _AQ_TARGET_GROUPS_PER_CTA))
    # small M: spread K over more CTAs, until about three CTAs per SM have work
    cs = max(cs, min(max_cs, groups, (3 * sms + token_blocks - 1) // token_blocks))
    gpc = (groups + cs - 1) // cs
    cs = (groups + gpc - 1) // gpc  # every CTA gets at least one group
    tiles = 1 if rank <= 32 else 2  # more would not fit the register budget of 3-4 CTAs per SM
    rank_block = min(32 * tiles, rank) if rank else 0
    rank_blocks = (rank + 32 * tiles - 1) // (32 * tiles) if rank else 1
    return cs, gpc, tiles, _act_quant_smem_bytes(gpc, rank_block, rank_blocks, cs, param_bytes, norm)


# whether the GPU co-schedules a cluster of more than 8 CTAs of this kernel: (name, device, cs, smem) -> bool
_large_clusters_fit: dict[tuple[str, int, int, int], bool] = {}


def act_quant(x: torch.Tensor, smooth: torch.Tensor, inv_smooth: torch.Tensor, shift: torch.Tensor | None,
              lora_down_p: torch.Tensor, pow2: bool = False, int8_operands: bool = False,
              rotation: tuple[int, torch.Tensor | None] = (kernels.ROTATION_NONE, None),
              norm: kernels.ModulatedNorm | None = None, norm_out: torch.Tensor | None = None,
              x2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel 1: x [M, K] -> (codes uint8 [M, K], ascales fp32, lora_act [M, rank]); ascales is
    [K/64, round_up(M, 4)] (per group), or [1, round_up(M, 4)] (per token) when pow2. lora_down_p is
    lora_down [K, rank] in kernel 1's layout (kernel1_lora_down): [rank, K]; shift: one fp32 value
    per 64-group (kernels.group_shifts). int8_operands (pow2 only): codes for the fast kernel 2 (s8 bytes)
    instead of e4m3 bytes. rotation: the layer's group rotation as kernels.kernel1_rotation gives it
    (W4A4Kernel.kernel1_rotation): (kind, coefficients or None). norm: x is a LayerNorm's input and kernel 1
    quantizes norm.apply(x) (the norm prologue; mult and add [B, K] or [B, 1, K] in x's dtype), also storing it
    into norm_out [M, K] where given. x2: kernel 1 quantizes the concatenation of x [M, K1] and x2 [M, K2] along
    K (K1 a multiple of 64), reading each where it is (unit column stride, rows 16-byte aligned), never with a norm."""
    if not (x.is_cuda and x.dim() == 2):
        raise RuntimeError("x must be a 2-D CUDA tensor")
    check_half(x, "x")
    m, k = x.shape[0], check_concat(x, x2, norm)
    if k % 64:
        raise RuntimeError(f"the input width {k} is not a multiple of 64")
    if lora_down_p.dim() != 2:
        raise RuntimeError("lora_down_p must be 2-D")
    if int8_operands and not pow2:
        raise RuntimeError("int8_operands needs pow2")
    rank = lora_down_p.shape[0]
    check_tensor(smooth, x, "smooth", torch.float32, (k,))
    check_tensor(inv_smooth, x, "inv_smooth", torch.float32, (k,))
    if shift is not None:
        check_tensor(shift, x, "shift", torch.float32, (k // 64,))
    rotation_passes, coef_shape = kernels.kernel1_rotation_passes(rotation, RuntimeError)
    rotation_kind, rotation_coef = rotation
    if coef_shape is not None:
        check_tensor(rotation_coef, x, "rotation coefficients", torch.float32, coef_shape)
    check_tensor(lora_down_p, x, "lora_down_p", x.dtype, (rank, k))
    norm_args = norm_arguments(norm, norm_out, x)
    m_al = (m + 3) // 4 * 4
    codes = torch.empty(m, k, dtype=torch.uint8, device=x.device)
    ascales = torch.empty(1 if pow2 else k // 64, m_al, dtype=torch.float32, device=x.device)
    lora_act = torch.empty(m, rank, dtype=x.dtype, device=x.device)
    if m == 0:
        return codes, ascales, lora_act
    if rank % kernels.RANK_MULTIPLE or rank > kernels.MAX_RANK:
        raise RuntimeError(f"act_quant: rank must be a multiple of {kernels.RANK_MULTIPLE} in [0, {kernels.MAX_RANK}]")
    # x and x2: check_concat
    if not aligned16(smooth, inv_smooth, shift, rotation_coef, lora_down_p, codes, ascales, lora_act):
        raise RuntimeError("act_quant: every tensor must start on a 16-byte boundary")
    try:
        tm_x, tm_x2 = (_map_2d(t, 64, _AQ_TOKENS, cuda.TENSOR_MAP_SWIZZLE_128B) for t in (x, x if x2 is None else x2))
    except cuda.CudaError as exc:
        raise RuntimeError(f"act_quant: cuTensorMapEncodeTiled rejected x ({exc})") from exc

    index, param_bytes = cuda.device_index(x.device), _act_quant_param_bytes(pow2)
    sms = sm_count(index)
    tiles = make_plan(m, k, rank, param_bytes, _AQ_MAX_CLUSTER_CTAS, sms, norm is not None)[2]
    path = "_coefficients" if rotation_kind == kernels.ROTATION_COEFFICIENTS else ""
    name = f"act_quant_{'pow2' if pow2 else 'exact'}_{_DTYPE_NAMES[x.dtype]}_tiles{tiles}{path}"
    fn = cuda.function(FAMILY, name, x.device)
    args = (tm_x, tm_x2, x.shape[1] // 64, smooth, inv_smooth, shift, rotation_passes, rotation_coef, lora_down_p,
            codes, ascales, lora_act, m, k, rank, m_al, int8_operands)
    # clusters of up to 16 CTAs where the GPU can co-schedule them, else the portable 8
    for max_cs in (_AQ_MAX_CLUSTER_CTAS, 8):
        cs, gpc, _, smem = make_plan(m, k, rank, param_bytes, max_cs, sms, norm is not None)
        if smem > _SMEM_LIMIT:
            raise RuntimeError("act_quant: K is too large for one cluster's shared memory")
        grid = (cs, (m_al + _AQ_TOKENS - 1) // _AQ_TOKENS)
        if cs > 8:
            key = (fn.name, index, cs, smem)
            if key not in _large_clusters_fit:
                _large_clusters_fit[key] = fn.max_active_clusters(grid, _AQ_THREADS, (cs, 1, 1), smem=smem) > 0
            if not _large_clusters_fit[key]:
                continue
        fn.launch(grid, _AQ_THREADS, args + (gpc,) + norm_args, smem=smem, cluster=(cs, 1, 1))
        break
    return codes, ascales, lora_act


# ---- kernel 2: the W4A4 GEMM + low-rank up + bias (w4a4_gemm.cu, w4a4_gemm_pow2.cu) -----------------

_GEMM_THREADS = 384       # two consumer warpgroups and the TMA producer's
_TILE_N = 128             # channels per CTA
_LORA_CHUNK = 32          # ranks per low-rank stage
_EPI_STRIDE = _TILE_N * 2 + 16


def _round_up(v: int, to: int) -> int:
    return (v + to - 1) // to * to


def _exact_gemm_smem_bytes() -> int:
    """w4a4_gemm.cu kSmemBytes: 8 stages of 128 tokens, the output staging tile, the barriers."""
    tile_t, stages = 128, 8
    stage = _round_up(tile_t * 64 + _TILE_N * _LORA_CHUNK * 2 + tile_t * 4 + _TILE_N * 2, 1024)
    return stages * stage + tile_t * _EPI_STRIDE + 2 * stages * 8 + 1024


def _pow2_gemm_smem_bytes(tile_t: int) -> int:
    """w4a4_gemm_pow2.cu Layout<tile_t>::kSmemBytes."""
    stages = 6 if tile_t == 256 else 8
    stage = _round_up(tile_t * 64 + _TILE_N * _LORA_CHUNK * 2 + _TILE_N, 1024)
    lut = stages * stage + tile_t * _EPI_STRIDE
    return lut + 5 * 16 + tile_t * 4 + _TILE_N * 4 + 2 * stages * 8 + 1024


EXACT_GEMM_SMEM_BYTES = _exact_gemm_smem_bytes()


def _gelu_channel(gelu_from: int, n: int) -> int:
    """Kernel 2's gelu_from: output channels from it on pass through GELU (tanh approximation) in the
    epilogue; negative (or N and beyond) for none."""
    return -1 if gelu_from < 0 or gelu_from >= n else gelu_from


def _checked_gemm_output(codes, lora_act, qweight, lora_up, bias, out, dtype) -> torch.Tensor:
    """The checks both kernel-2 variants share (codes [M, K], lora_act [M, r], natural qweight
    [N, K/2], lora_up [N, r], bias [N]); returns the output y [M, N] (`out` where given)."""
    (m, k), n, rank = codes.shape, qweight.shape[0], lora_up.shape[1]
    if k % 64:
        raise RuntimeError(f"the input width {k} is not a multiple of 64")
    if n % 8:
        raise RuntimeError(f"the output width {n} is not a multiple of 8")
    check_tensor(codes, codes, "codes", torch.uint8, (m, k))
    check_tensor(lora_act, codes, "lora_act", dtype, (m, rank))
    check_tensor(qweight, codes, "qweight", torch.uint8, (n, k // 2))
    check_tensor(lora_up, codes, "lora_up", dtype, (n, rank))
    if bias is not None:
        check_tensor(bias, codes, "bias", dtype, (n,))
    y = out if out is not None else torch.empty(m, n, dtype=dtype, device=codes.device)
    check_tensor(y, codes, "out", dtype, (m, n))
    return y


def _lowrank_maps(lora_act: torch.Tensor, lora_up: torch.Tensor, token_box: int):
    """lora_act's and lora_up's maps: 32-rank chunks of token_box tokens and 128 channels."""
    if not lora_up.shape[1]:
        return _UNUSED_MAP, _UNUSED_MAP
    return (_map_2d(lora_act, _LORA_CHUNK, token_box, cuda.TENSOR_MAP_SWIZZLE_64B),
            _map_2d(lora_up, _LORA_CHUNK, _TILE_N, cuda.TENSOR_MAP_SWIZZLE_64B))


def w4a4_gemm(codes: torch.Tensor, ascales: torch.Tensor, lora_act: torch.Tensor, qweight: torch.Tensor,
              wscales: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor | None = None, gelu_from: int = -1,
              residual: kernels.GatedResidual | None = None) -> torch.Tensor:
    """Kernel 2, exact path: y [M, N] = W4A4 product of kernel 1's outputs with the natural-layout
    weights + low rank + bias, then GELU on the channels from gelu_from on (none where negative); with a
    residual, residual + gate * y instead (out may be the residual's tensor: in place)."""
    if not (codes.is_cuda and codes.dim() == 2):
        raise RuntimeError("codes must be a 2-D CUDA tensor")
    if not (qweight.dim() == 2 and lora_up.dim() == 2 and ascales.dim() == 2):
        raise RuntimeError("qweight, lora_up and ascales are 2-D")
    check_half(wscales, "wscales")
    dtype = wscales.dtype
    (m, k), n, rank = codes.shape, qweight.shape[0], lora_up.shape[1]
    m_al = (m + 3) // 4 * 4
    y = _checked_gemm_output(codes, lora_act, qweight, lora_up, bias, out, dtype)
    gated = residual_arguments(residual, y)
    ascale_rows = ascales.shape[0]
    if ascale_rows not in (k // 64, 1):
        raise RuntimeError("ascales must have K/64 rows (per group) or 1 (per token)")
    check_tensor(ascales, codes, "ascales", torch.float32, (ascale_rows, m_al))
    check_tensor(wscales, codes, "wscales", dtype, (k // 64, n))
    if m == 0:
        return y
    if rank % kernels.RANK_MULTIPLE:
        raise RuntimeError(f"w4a4_gemm: rank must be a multiple of {kernels.RANK_MULTIPLE}")
    if not aligned16(codes, ascales, lora_act, qweight, wscales, lora_up, y):
        raise RuntimeError("w4a4_gemm: every tensor must start on a 16-byte boundary")
    try:
        maps = (_map_2d(codes, 64, 128, cuda.TENSOR_MAP_SWIZZLE_64B), _map_2d(qweight, 32, _TILE_N),
                _map_2d(ascales, 128, 1), _map_2d(wscales, _TILE_N, 1), *_lowrank_maps(lora_act, lora_up, 128))
    except cuda.CudaError as exc:
        raise RuntimeError(f"w4a4_gemm: cuTensorMapEncodeTiled rejected a tensor ({exc})") from exc
    scales = "token" if ascale_rows == 1 else "group"
    fn = cuda.function(FAMILY, f"w4a4_gemm_{scales}_scales_{_DTYPE_NAMES[dtype]}", codes.device)
    fn.launch(((n + _TILE_N - 1) // _TILE_N, (m + 127) // 128), _GEMM_THREADS,
              (*maps, ascales, bias, y, m, m_al, n, k, rank, _gelu_channel(gelu_from, n), *gated),
              smem=EXACT_GEMM_SMEM_BYTES)
    return y


# A CTA's time is taken as its count of whole tiles plus HALF_TILE_COST per half tile: a 128-token
# tile took 0.74 of a 256-token tile's time (M = 4608, N = K = 3072, rounds of 132 tiles). Half
# tiles are used only where this model predicts at least MIN_HALF_TILE_GAIN: at a predicted 2%
# (M = 4608, N = 12288, K = 3072) they measured 4% slower (bench/NOTES.md#v19).
HALF_TILE_COST = 0.75
MIN_HALF_TILE_GAIN = 0.05


# Token rows per band of the fast kernel 2's schedule (w4a4_gemm_pow2.cu tile_coords) for a layer with at
# least half the SMs' worth of channel tiles: about the rows that minimize what one round of CTAs reads
# (rows x 256-token activation tiles + SMs / rows weight tiles of a quarter their size). With fewer channel
# tiles a round already spans several token rows and the weights stay in L2, so wider bands only re-read
# activations: 1 (bench/NOTES.md#k2-bands).
WIDE_BAND_ROWS = 6


@functools.lru_cache(maxsize=4096)
def make_schedule(m: int, tiles_n: int, tile_t: int, half_rows: int, band_rows: int,
                  sms: int) -> tuple[int, int, int, int]:
    """The fast kernel 2's persistent schedule (big_tiles, tiles, ctas, band_rows): CTA b runs tiles b,
    b + ctas, ... With 256-token tiles, the last half_rows token rows run as 128-token half tiles after the
    big ones; half_rows < 0 takes the count (up to 4) that gives the shortest longest CTA by the
    cost above, e.g. 3.75 instead of 4 tile times for 432 tiles on 132 SMs. The big tiles run in bands
    of band_rows token rows (0: WIDE_BAND_ROWS or 1, as above), at most all of their rows."""
    rows = (m + tile_t - 1) // tile_t

    def plan(h: int) -> tuple[int, int, int]:
        big_rows = rows - h
        small_rows = (m - big_rows * tile_t + tile_t // 2 - 1) // (tile_t // 2) if h else 0
        big, tiles = big_rows * tiles_n, (big_rows + small_rows) * tiles_n
        return big, tiles, min(tiles, sms)

    def longest(s: tuple[int, int, int]) -> float:
        big, tiles, ctas = s
        worst = 0.0
        for b in range(ctas):
            whole = (big - b + ctas - 1) // ctas if big > b else 0
            every = (tiles - b + ctas - 1) // ctas
            worst = max(worst, whole + (every - whole) * HALF_TILE_COST)
        return worst

    def chosen_half_rows() -> int:
        if tile_t != 256:
            return 0
        if half_rows >= 0:
            return min(half_rows, rows)
        whole_time = longest(plan(0))
        best, best_time = 0, whole_time
        for h in range(1, min(rows, 4) + 1):
            t = longest(plan(h))
            if t < best_time - 1e-9:
                best, best_time = h, t
        return best if best_time <= whole_time * (1 - MIN_HALF_TILE_GAIN) else 0

    big, tiles, ctas = plan(chosen_half_rows())
    band_rows = band_rows or (1 if 2 * tiles_n < sms else WIDE_BAND_ROWS)
    return big, tiles, ctas, min(band_rows, max(1, big // tiles_n))


def token_tile(m: int, n: int, sms: int) -> int:
    """The fast kernel 2's tokens per tile when not forced: 256 when 256-token tiles give at least
    half of the SMs a tile, else 128. 256 expands each weight for twice the tokens and measured
    faster wherever that held (M = 256..4608 at the FLUX shapes, bench/NOTES.md#v16), even with fewer
    tiles than SMs; 192 never measured best."""
    tiles = (n + _TILE_N - 1) // _TILE_N * ((m + 255) // 256)
    return 256 if 2 * tiles >= sms else 128


def w4a4_gemm_pow2(codes: torch.Tensor, atok: torch.Tensor, lora_act: torch.Tensor, qweight: torch.Tensor,
                   wexp: torch.Tensor, wbase: torch.Tensor, lora_up: torch.Tensor, bias: torch.Tensor | None,
                   out: torch.Tensor | None = None, tile_t: int = 0, half_rows: int = -1,
                   gelu_from: int = -1, residual: kernels.GatedResidual | None = None,
                   band_rows: int = 0) -> torch.Tensor:
    """Fast kernel 2 (power-of-two weight scales wbase * 2^-wexp, pow2-mode kernel 1 outputs with int8
    operands): y [M, N]. tile_t, half_rows, band_rows: the token tile, the count of trailing 256-token rows
    run as 128-token tiles and the token rows per band of the schedule (0 / -1 / 0: chosen); gelu_from
    and residual as in w4a4_gemm."""
    if not (codes.is_cuda and codes.dim() == 2):
        raise RuntimeError("codes must be a 2-D CUDA tensor")
    if not (qweight.dim() == 2 and lora_up.dim() == 2 and wexp.dim() == 2):
        raise RuntimeError("qweight, lora_up and wexp are 2-D")
    check_half(lora_act, "lora_act")
    dtype = lora_act.dtype
    (m, k), n, rank = codes.shape, qweight.shape[0], lora_up.shape[1]
    m_al, n_al = (m + 3) // 4 * 4, (n + 15) // 16 * 16
    y = _checked_gemm_output(codes, lora_act, qweight, lora_up, bias, out, dtype)
    gated = residual_arguments(residual, y)
    check_tensor(atok, codes, "atok", torch.float32, (1, m_al))
    check_tensor(wexp, codes, "wexp", torch.uint8, (k // 64, n_al))
    check_tensor(wbase, codes, "wbase", torch.float32, (n,))
    if m == 0:
        return y
    if rank % kernels.RANK_MULTIPLE:
        raise RuntimeError(f"w4a4_gemm_pow2: rank must be a multiple of {kernels.RANK_MULTIPLE}")
    if k > 131072:
        raise RuntimeError("w4a4_gemm_pow2: K must be at most 131072 (exact int32 accumulation)")
    if not aligned16(codes, atok, lora_act, qweight, wexp, wbase, lora_up, y):
        raise RuntimeError("w4a4_gemm_pow2: every tensor must start on a 16-byte boundary")
    if tile_t not in (0, 128, 256):
        raise RuntimeError("w4a4_gemm_pow2: tile_t must be 0, 128 or 256")
    if band_rows < 0:
        raise RuntimeError("w4a4_gemm_pow2: band_rows must be 0 (chosen) or a count of token rows")
    sms = sm_count(cuda.device_index(codes.device))
    tile_t = tile_t or token_tile(m, n, sms)
    try:
        lact, lup = _lowrank_maps(lora_act, lora_up, tile_t)
        lact_half = _lowrank_maps(lora_act, lora_up, tile_t // 2)[0]
        maps = (_map_2d(codes, 64, tile_t, cuda.TENSOR_MAP_SWIZZLE_64B), _map_2d(qweight, 32, _TILE_N),
                _map_2d(wexp, _TILE_N, 1), lact, lup, _map_2d(codes, 64, tile_t // 2, cuda.TENSOR_MAP_SWIZZLE_64B),
                lact_half)
    except cuda.CudaError as exc:
        raise RuntimeError(f"w4a4_gemm_pow2: cuTensorMapEncodeTiled rejected a tensor ({exc})") from exc
    tiles_n = (n + _TILE_N - 1) // _TILE_N
    big_tiles, tiles, ctas, band_rows = make_schedule(m, tiles_n, tile_t, max(-1, min(half_rows, 1 << 20)),
                                                      min(band_rows, 1 << 20), sms)
    fn = cuda.function(FAMILY, f"w4a4_gemm_pow2_t{tile_t}_{_DTYPE_NAMES[dtype]}", codes.device)
    fn.launch(ctas, _GEMM_THREADS, (*maps, atok, wbase, bias, y, m, m_al, n, k, rank, _gelu_channel(gelu_from, n),
                                    *gated, tiles_n, big_tiles, tiles, band_rows), smem=_pow2_gemm_smem_bytes(tile_t))
    return y


# ---- a layer's op (kernels.W4A4Kernel) -------------------------------------------------------------

def kernel1_lora_down(lora_down: torch.Tensor) -> torch.Tensor:
    """lora_down [K, r] in kernel 1's layout [r, K]: each 64-group's columns reordered so that an
    mma lane's B fragments of the group are 32 contiguous bytes (act_quant.cu):
    out[n, 64 g + 16 q + 4 s + 2 h + e] = lora_down[64 g + 16 s + 8 h + 2 q + e, n]."""
    k, r = lora_down.shape
    # [n, g, s, h, q, e] -> [n, g, q, s, h, e]
    grouped = lora_down.t().reshape(r, k // 64, 4, 2, 4, 2)
    return grouped.permute(0, 1, 4, 2, 3, 5).reshape(r, k).contiguous()


def kernel1_inputs(kernel: kernels.W4A4Kernel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor]:
    """Kernel 1's per-layer inputs, kept by the kernel: fp32 smooth, 1/smooth (correctly rounded), the
    shift per group (W4A4Kernel.group_shifts), and lora_down in its layout (kernel1_lora_down), or no
    ranks ([0, K]) above kernels.KERNEL1_MAX_RANK, where svdq_linear computes the low-rank input
    with cuBLAS."""
    smooth, down = kernel.smooth, kernel.lora_down

    def compute():
        smooth32 = smooth.float().contiguous()
        fused_rank = down.shape[1] if down.shape[1] <= kernels.KERNEL1_MAX_RANK else 0
        return smooth32, torch.reciprocal(smooth32), kernel.group_shifts(), kernel1_lora_down(down[:, :fused_rank])

    return kernel.derived("sm90_kernel1_inputs", (smooth, down, kernel.shift), compute)


def pow2_weight_operands(kernel: kernels.W4A4Kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path's weight-scale exponents (uint8 [K/64, round_up(N, 16)], rows padded for TMA)
    and row bases (fp32 [N]), kept by the kernel."""

    def compute():
        wbase, exps = numerics.pow2_weight_exponents(kernel.wscales)
        groups, n = exps.shape
        padded = torch.zeros(groups, (n + 15) // 16 * 16, dtype=torch.uint8, device=exps.device)
        padded[:, :n] = exps
        return padded, wbase.contiguous()

    return kernel.derived("sm90_pow2_weights", (kernel.wscales,), compute)


def act_operands_to_natural(codes: torch.Tensor, int8_operands: bool = False) -> torch.Tensor:
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


def svdq_linear(x: torch.Tensor | kernels.Concat, kernel: kernels.W4A4Kernel, out: torch.Tensor | None = None,
                norm: kernels.ModulatedNorm | None = None, residual: kernels.GatedResidual | None = None
                ) -> torch.Tensor:
    """The two Hopper kernels on x [M, K] (a call W4A4Kernel routes here): W4A4Kernel.reference's
    function of x, or of norm.apply(x) (kernel 1's norm prologue; above KERNEL1_MAX_RANK kernel 1 also stores
    that input for the low-rank GEMM); x a kernels.Concat: kernel 1 reads its parts where they are (KERNEL1_CONCAT);
    residual: residual + gate * y in kernel 2's epilogue (KERNEL2_RESIDUAL); `out`: where to write y [M, N]."""
    pow2 = kernel.pow2_activations
    fast = pow2 and kernel.pow2_weights
    wide = kernel.rank > kernels.KERNEL1_MAX_RANK  # cuBLAS computes the low-rank input, from the layer's input
    x, second = kernel1_operands(x, wide)
    # pow2 mode: ascales is [1, m_al], each token's scale atok, the 2^-e being in the codes
    normalized = torch.empty_like(x) if wide and norm is not None else None
    codes, ascales, lora_act = act_quant(x, *kernel1_inputs(kernel), pow2, fast, kernel.kernel1_rotation(), norm,
                                         normalized, second)
    if wide:
        lora_act = (x if normalized is None else normalized) @ kernel.lora_down
    gelu_from = -1 if kernel.gelu_from is None else kernel.gelu_from
    if fast:
        wexp, wbase = pow2_weight_operands(kernel)
        return w4a4_gemm_pow2(codes, ascales, lora_act, kernel.qweight.contiguous(), wexp, wbase,
                              kernel.lora_up.contiguous(), kernel.bias, out, gelu_from=gelu_from, residual=residual)
    return w4a4_gemm(codes, ascales, lora_act, kernel.qweight.contiguous(), kernel.wscales.contiguous(),
                     kernel.lora_up.contiguous(), kernel.bias, out, gelu_from, residual)
