"""Kernel 2, the W4A4 GEMM (docs/DESIGN.md#kernels): every W4A4 family's kernel 2 on its kernel 1's
outputs against a float64 evaluation of the same codes, scales and low-rank inputs (1e-3), with
the epilogue's bias, low-rank up projection and GELU; the power-of-two operands' exactness; the
launchers' argument checks.

sm90: the exact kernel 2 (FP8 wgmma, per-group promotion; also on kernel 1's pow2-mode outputs with
per-token scales) and the fast kernel 2 (power-of-two weight and activation scales, INT8 wgmma,
persistent schedule with half tiles), on an sm_90 GPU. sm80: both mma.sync variants (int4, int8)
on any sm_80+ GPU.
"""

from __future__ import annotations

import pytest
import torch

from random_layers import (activations, gelu_tanh64, gen, needs_sm80, needs_sm90, rel, sm80_kernel1, sm90_kernel1,
                           w4a4_layer)
from svdquant import kernels, numerics
from svdquant.families import sm80, sm90
from svdquant.linear import SVDQLinear

DEV = "cuda"
G = numerics.GROUP_SIZE


def test_pow2_operands_are_exact_in_e4m3_and_s8():
    codes = torch.arange(-8, 16, dtype=torch.float32)
    for e in range(numerics.POW2_ACT_MAX_EXP + 1):
        value = codes * 2.0 ** -e  # the FP8 activation operand of the exact kernel 2 (power-of-two activations)
        assert torch.equal(value.to(torch.float8_e4m3fn).float(), value)
        s8 = codes * 2 ** (numerics.POW2_ACT_MAX_EXP - e)  # the fast kernel's activation operand
        assert int(s8.min()) >= -128 and int(s8.max()) <= 127
    weights = torch.arange(-8, 8)
    for f in range(numerics.POW2_WEIGHT_MAX_EXP + 1):
        s8 = weights * 2 ** (numerics.POW2_WEIGHT_MAX_EXP - f)
        assert int(s8.min()) >= -128 and int(s8.max()) <= 127


def _check_gelu_tail(y: torch.Tensor, ref: torch.Tensor, gelu_from: int) -> None:
    """GELU's negative tail (outputs down to about -0.17) to the precision of y's dtype; a tail exactly
    where some channels pass through the GELU (gelu_from below N)."""
    neg = ref[:, gelu_from:] < -1e-2
    assert bool(neg.any()) == (gelu_from < ref.shape[1])
    tail = (y[:, gelu_from:][neg].double() - ref[:, gelu_from:][neg]).abs() / ref[:, gelu_from:][neg].abs()
    assert tail.numel() == 0 or float(tail.max()) <= (2 ** -7 if y.dtype == torch.bfloat16 else 2 ** -9)


# ---- sm90: w4a4_gemm.cu, w4a4_gemm_pow2.cu --------------------------------------------------------

def _sm90_reference(codes: torch.Tensor, ascales: torch.Tensor, lora_act: torch.Tensor, layer: SVDQLinear,
                    int8_operands: bool):
    """float64 evaluation of sm90 kernel 2 on kernel 1's outputs (group or token scales)."""
    m, k = codes.shape
    n, groups = layer.out_features, k // G
    a = sm90.act_operands_to_natural(codes, int8_operands).double().reshape(m, groups, G)
    w = numerics.unpack_int4(layer.qweight, signed=True).double().reshape(n, groups, G)
    y = torch.zeros(m, n, dtype=torch.float64, device=DEV)
    for g in range(groups):
        asc = ascales[g if ascales.shape[0] > 1 else 0, :m].double()
        y += (a[:, g] @ w[:, g].t()) * asc[:, None] * layer.wscales[g].double()[None, :]
    y += lora_act.double() @ layer.lora_up.double().t()
    if layer.bias is not None:
        y += layer.bias.double()
    return y


def _sm90_run(x: torch.Tensor, layer: SVDQLinear, pow2: bool = False, fast: bool = False, tile_t: int = 0,
              half_rows: int = -1, gelu_from: int = -1, band_rows: int = 0):
    """sm90 kernels 1 and 2 on poisoned outputs; returns (y, float64 reference on kernel 1's outputs)."""
    codes, ascales, lora_act = sm90_kernel1(x, layer, pow2 or fast, fast)
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=DEV)
    if fast:
        wexp, wbase = sm90.pow2_weight_operands(layer.w4a4_kernel())
        y = sm90.w4a4_gemm_pow2(codes, ascales, lora_act, layer.qweight, wexp, wbase, layer.lora_up, layer.bias, out,
                                tile_t, half_rows, gelu_from, band_rows=band_rows)
    else:
        y = sm90.w4a4_gemm(codes, ascales, lora_act, layer.qweight, layer.wscales, layer.lora_up, layer.bias, out,
                           gelu_from)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    assert bool(torch.isfinite(y).all()), f"{int((~torch.isfinite(y)).sum())} outputs unwritten or not finite"
    ref = _sm90_reference(codes, ascales, lora_act, layer, fast)
    if gelu_from >= 0:
        ref[:, gelu_from:] = gelu_tanh64(ref[:, gelu_from:])
    return y, ref


@needs_sm90
@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097, 4608])
@pytest.mark.parametrize("rank", [32, 160])
@pytest.mark.parametrize("pow2", [False, True])
def test_sm90_gemm_matches_float64(m, rank, pow2):
    # pow2: the exact kernel 2 on kernel 1's pow2 outputs (per-token scales, 2^-e in the codes)
    generator = gen(1000 + m + rank + pow2)
    layer = w4a4_layer(384, 576, rank, torch.bfloat16, generator, unsigned=False)
    x = activations(m, 576, torch.bfloat16, generator, layer.unsigned_groups)
    y, ref = _sm90_run(x, layer, pow2)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm90
@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097, 4608])
@pytest.mark.parametrize("rank", [32, 160, 224])
@pytest.mark.parametrize("tile_t", [128, 256])
def test_sm90_fast_gemm_matches_float64(m, rank, tile_t):
    # K = 576: 9 groups, an odd count for the main loop unrolled by two; rank 224 = 32 + 64 + 128
    generator = gen(2000 + m + rank + tile_t)
    layer = w4a4_layer(384, 576, rank, torch.bfloat16, generator, unsigned=False, pow2_weights=True)
    x = activations(m, 576, torch.bfloat16, generator, layer.unsigned_groups)
    y, ref = _sm90_run(x, layer, fast=True, tile_t=tile_t)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm90
@pytest.mark.parametrize("m,half_rows", [(4608, 1), (4608, 3), (4097, 1), (4097, 2), (300, 1), (300, 5)])
def test_sm90_fast_gemm_half_tiles(m, half_rows):
    # the last half_rows 256-token rows of the schedule run as 128-token tiles after the whole ones;
    # 4097: the last half tile holds one token; 300: both rows, and more rows asked for than exist
    generator = gen(4000 + m + half_rows)
    layer = w4a4_layer(3072, 256, 32, torch.bfloat16, generator, unsigned=True, pow2_weights=True)
    x = activations(m, 256, torch.bfloat16, generator, layer.unsigned_groups)
    y, ref = _sm90_run(x, layer, fast=True, tile_t=256, half_rows=half_rows)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm90
@pytest.mark.parametrize("m,tile_t,half_rows", [(4608, 256, 0), (4608, 256, 3), (4097, 256, 2), (4097, 128, -1),
                                                 (300, 256, 1)])
@pytest.mark.parametrize("band_rows", [2, 3, 7, 1000])
def test_sm90_fast_gemm_bands(m, tile_t, half_rows, band_rows):
    # the whole tiles in bands of token rows, the last band shorter (3, 7 rows) or the only one (1000),
    # with and without half tiles after them
    generator = gen(5000 + m + tile_t + half_rows + band_rows)
    layer = w4a4_layer(3072, 256, 32, torch.bfloat16, generator, unsigned=True, pow2_weights=True)
    x = activations(m, 256, torch.bfloat16, generator, layer.unsigned_groups)
    y, ref = _sm90_run(x, layer, fast=True, tile_t=tile_t, half_rows=half_rows, band_rows=band_rows)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm90
@pytest.mark.parametrize("m", [4097, 4608])
@pytest.mark.parametrize("tile_t", [128, 256])
def test_sm90_fast_gemm_persistent_tiles(m, tile_t):
    # 24 channel tiles x 17..36 token tiles: more tiles than SMs, so each CTA runs several in a row
    generator = gen(3000 + m + tile_t)
    layer = w4a4_layer(3072, 256, 32, torch.bfloat16, generator, unsigned=True, pow2_weights=True)
    x = activations(m, 256, torch.bfloat16, generator, layer.unsigned_groups)
    y, ref = _sm90_run(x, layer, fast=True, tile_t=tile_t)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm90
@pytest.mark.parametrize("n,k,rank,dtype,unsigned,bias", [
    (136, 64, 0, torch.bfloat16, False, True),      # one group, a partial channel tile, no low rank
    (8, 192, 16, torch.float16, True, False),       # 8 channels, three groups, unsigned groups, fp16
    (3072, 3072, 32, torch.bfloat16, True, True),   # a FLUX shape
    (520, 1024, 48, torch.float16, False, True),
])
@pytest.mark.parametrize("path", ["exact", "exact_pow2_act", "fast", "fast256"])
def test_sm90_gemm_awkward_shapes(n, k, rank, dtype, unsigned, bias, path):
    generator = gen(n + k + rank)
    fast = path.startswith("fast")
    layer = w4a4_layer(n, k, rank, dtype, generator, unsigned, bias, pow2_weights=fast)
    x = activations(300, k, dtype, generator, layer.unsigned_groups)
    y, ref = _sm90_run(x, layer, pow2=path == "exact_pow2_act", fast=fast,
                       tile_t=int(path[4:] or 128) if fast else 0)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm90
@pytest.mark.parametrize("gelu_from", [0, 136, 384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["exact", "fast", "fast256"])
def test_sm90_gemm_epilogue_gelu(gelu_from, dtype, path):
    # GELU (tanh approximation) on the output channels from gelu_from on, in fp32 before the
    # rounding: 0 all of them (an MLP's first layer), 136 from inside the second channel tile (the
    # rows of one warp on both sides; FLUX's single blocks start it at 3 x hidden size), 384 = N none
    generator = gen(5000 + gelu_from)
    fast = path.startswith("fast")
    layer = w4a4_layer(384, 576, 32, dtype, generator, unsigned=False, pow2_weights=fast)
    x = activations(300, 576, dtype, generator, layer.unsigned_groups)
    y, ref = _sm90_run(x, layer, fast=fast, tile_t=int(path[4:] or 128) if fast else 0, gelu_from=gelu_from)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)
    _check_gelu_tail(y, ref, gelu_from)


def _check_gated_residual(kernel2, residual: torch.Tensor, gate: torch.Tensor, in_place: bool) -> None:
    """kernel2(out, gated) handed a kernels.GatedResidual must write numerics.gated_residual of its own output
    y = kernel2(None, None) bit for bit (the product rounded to the dtype, then the sum), the gate row of each
    token's batch: into the residual's own tensor where in_place, else into a fresh output."""
    (m, n), batches = residual.shape, gate.shape[0]
    y = kernel2(None, None)
    expected = numerics.gated_residual(residual.reshape(batches, m // batches, n), gate.unsqueeze(1),
                                       y.reshape(batches, m // batches, n)).reshape(m, n)
    target = residual.clone() if in_place else None
    got = kernel2(target, kernels.GatedResidual(residual.clone() if not in_place else target, gate))
    torch.cuda.synchronize()
    if in_place:
        assert got.data_ptr() == target.data_ptr()
    differ = (got != expected).nonzero()
    assert differ.numel() == 0, f"{differ.shape[0]} differ, first at {differ[:5].tolist()}"


@needs_sm90
@pytest.mark.parametrize("m,batches", [(1, 1), (255, 1), (4097, 1), (600, 2), (4608, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["exact", "fast", "fast256"])
@pytest.mark.parametrize("in_place", [False, True])
def test_sm90_gemm_epilogue_gated_residual(m, batches, dtype, path, in_place):
    # both kernel 2s with a kernels.GatedResidual (_check_gated_residual), with a GELU on part of the channels as well
    generator = gen(5100 + m + batches)
    fast = path.startswith("fast")
    layer = w4a4_layer(392, 576, 32, dtype, generator, unsigned=False, pow2_weights=fast)
    x = activations(m, 576, dtype, generator, layer.unsigned_groups)
    residual = (torch.randn(m, 392, generator=generator, device=DEV) * 4).to(dtype)
    gate = (torch.randn(batches, 392, generator=generator, device=DEV)).to(dtype)
    codes, ascales, lora_act = sm90_kernel1(x, layer, fast, fast)
    tile_t = int(path[4:] or 128) if fast else 0

    def kernel2(out, gated):
        if fast:
            wexp, wbase = sm90.pow2_weight_operands(layer.w4a4_kernel())
            return sm90.w4a4_gemm_pow2(codes, ascales, lora_act, layer.qweight, wexp, wbase, layer.lora_up,
                                       layer.bias, out, tile_t, gelu_from=136, residual=gated)
        return sm90.w4a4_gemm(codes, ascales, lora_act, layer.qweight, layer.wscales, layer.lora_up, layer.bias,
                              out, 136, gated)

    _check_gated_residual(kernel2, residual, gate, in_place)


@needs_sm90
def test_sm90_bad_kernel_inputs_raise_named_errors():
    # the host side's checks must raise (with the numbers in the message), never crash the process
    layer = w4a4_layer(64, 128, 32, torch.bfloat16, gen(9), unsigned=False)
    smooth, inv_smooth, shift, down = sm90.kernel1_inputs(layer.w4a4_kernel())
    with pytest.raises(RuntimeError, match="input width 100 is not a multiple of 64"):
        sm90.act_quant(torch.zeros(4, 100, device=DEV, dtype=torch.bfloat16), smooth, inv_smooth, shift, down, False)
    with pytest.raises(RuntimeError, match="int8_operands needs pow2"):
        sm90.act_quant(torch.zeros(4, 128, device=DEV, dtype=torch.bfloat16), smooth, inv_smooth, shift, down, False,
                       True)
    codes, ascales, lora_act = sm90_kernel1(torch.zeros(4, 128, device=DEV, dtype=torch.bfloat16), layer)
    with pytest.raises(RuntimeError, match=r"wscales must have shape \[2, 64\], got \[2, 32\]"):
        sm90.w4a4_gemm(codes, ascales, lora_act, layer.qweight, layer.wscales[:, :32].contiguous(), layer.lora_up,
                       layer.bias)


# ---- sm80: w4a4_gemm.cu (int4 and int8 mma.sync) --------------------------------------------------

SM80_AWKWARD_SHAPES = [
    (8, 64, 16, torch.bfloat16, False, True),       # one group, one 8-channel slice of a tile
    (136, 192, 24, torch.float16, True, False),     # a second channel tile with 8 channels; rank padded
    (1000, 640, 48, torch.bfloat16, True, True),    # partial last tile, rank above kernel 1's
    (520, 1024, 0, torch.float16, False, True),     # no low-rank branch
]


def _unpack_act(codes: torch.Tensor, unsigned_groups: torch.Tensor) -> torch.Tensor:
    """sm80 kernel 1's packed codes [M, K/2] -> int8 [M, K] (unsigned groups without sign extension)."""
    signed = numerics.unpack_int4(codes, signed=True)
    plain = numerics.unpack_int4(codes, signed=False)
    return torch.where(unsigned_groups.to(codes.device).repeat_interleave(G), plain, signed)


def _sm80_reference(codes, ascales, lora_act, layer: SVDQLinear, gelu_from: int | None = None) -> torch.Tensor:
    """float64 evaluation of sm80 kernel 2 on kernel 1's outputs."""
    m, k = codes.shape[0], codes.shape[1] * 2
    n, groups = layer.out_features, k // G
    a = _unpack_act(codes, layer.unsigned_groups).double().reshape(m, groups, G)
    w = numerics.unpack_int4(layer.qweight, signed=True).double().reshape(n, groups, G)
    y = torch.zeros(m, n, dtype=torch.float64, device=DEV)
    for g in range(groups):
        y += (a[:, g] @ w[:, g].t()) * ascales[g, :m].double()[:, None] * layer.wscales[g].double()[None, :]
    if lora_act is not None:
        rank = layer.lora_up.shape[1]
        y += lora_act[:, :rank].double() @ layer.lora_up.double().t()
    if layer.bias is not None:
        y += layer.bias.double()
    if gelu_from is not None:
        y[:, gelu_from:] = gelu_tanh64(y[:, gelu_from:])
    return y


def _sm80_run(x: torch.Tensor, layer: SVDQLinear, mma: str, pow2: bool = False, gelu_from: int | None = None):
    """sm80 kernels 1 and 2 (as sm80.svdq_linear runs them) on a poisoned output; returns (y, float64
    reference)."""
    kernel = layer.w4a4_kernel()
    group_shift = sm80.kernel1_inputs(kernel)[2]
    codes, ascales, lora_act = sm80_kernel1(x, layer, pow2)
    if layer.rank > kernels.KERNEL1_MAX_RANK:
        lora_act = torch.nn.functional.pad(x @ layer.lora_down, (0, -layer.rank % kernels.RANK_MULTIPLE)).contiguous()
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=DEV)
    y = sm80.w4a4_gemm(codes, ascales, group_shift, layer.qweight, layer.wscales, lora_act,
                       sm80.padded_lora_up(kernel), layer.bias, out, gelu_from, mma)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    assert bool(torch.isfinite(y).all()), f"{int((~torch.isfinite(y)).sum())} outputs unwritten or not finite"
    return y, _sm80_reference(codes, ascales, lora_act, layer, gelu_from)


@needs_sm80
@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097, 4608])
@pytest.mark.parametrize("rank", [32, 160])
@pytest.mark.parametrize("pow2", [False, True])
def test_sm80_gemm_matches_float64(mma, m, rank, pow2):
    generator = gen(1000 + m + rank + pow2)
    layer = w4a4_layer(384, 576, rank, torch.bfloat16, generator, unsigned=False)
    x = activations(m, 576, torch.bfloat16, generator, layer.unsigned_groups)
    y, ref = _sm80_run(x, layer, mma, pow2)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm80
@pytest.mark.parametrize("n,k,rank,dtype,unsigned,bias", SM80_AWKWARD_SHAPES)
@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
def test_sm80_gemm_awkward_shapes(n, k, rank, dtype, unsigned, bias, mma):
    generator = gen(n + k + rank)
    layer = w4a4_layer(n, k, rank, dtype, generator, unsigned, bias)
    x = activations(300, k, dtype, generator, layer.unsigned_groups)
    y, ref = _sm80_run(x, layer, mma, pow2=unsigned)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm80
@pytest.mark.parametrize("gelu_from", [0, 136, 384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
def test_sm80_gemm_epilogue_gelu(gelu_from, dtype, mma):
    # 0: all channels (an MLP's first layer); 136: from inside the second channel tile; 384 = N: none
    generator = gen(5000 + gelu_from)
    layer = w4a4_layer(384, 576, 32, dtype, generator, unsigned=False)
    x = activations(300, 576, dtype, generator, layer.unsigned_groups)
    y, ref = _sm80_run(x, layer, mma, gelu_from=gelu_from)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)
    _check_gelu_tail(y, ref, gelu_from)


def _sm80_whole_k_run(x: torch.Tensor, layer: SVDQLinear, gelu_from: int | None = None):
    """Kernel 1 in pow2_s8 mode and the whole-K kernel 2 (as sm80.svdq_linear runs them on a
    power-of-two layer) on a poisoned output; returns (y, float64 reference on kernel 1's outputs)."""
    kernel = layer.w4a4_kernel()
    smooth, inv_smooth, group_shift, lora_t = sm80.kernel1_inputs(kernel)
    codes, atok, lora_act = sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=True, int8_operands=True)
    if layer.rank > kernels.KERNEL1_MAX_RANK:
        lora_act = torch.nn.functional.pad(x @ layer.lora_down, (0, -layer.rank % kernels.RANK_MULTIPLE)).contiguous()
    wexp, wbase = sm80.pow2_weight_operands(kernel)
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=DEV)
    y = sm80.w4a4_gemm_pow2(codes, atok, layer.qweight, wexp, wbase, x.dtype, lora_act, sm80.padded_lora_up(kernel),
                            layer.bias, out, gelu_from)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    assert bool(torch.isfinite(y).all()), f"{int((~torch.isfinite(y)).sum())} outputs unwritten or not finite"
    m, k = codes.shape
    # the s8 operand is code * 2^(3 - e): times atok * 2^-3 it is code * ascale
    a = sm80.int8_operands_to_natural(codes).double() * (atok[0, :m].double()[:, None] * 2.0 ** -3)
    w = numerics.unpack_int4(layer.qweight, signed=True).double() * layer.wscales.double().t().repeat_interleave(G, 1)
    ref = a @ w.t()
    if lora_act is not None:
        ref += lora_act[:, :layer.rank].double() @ layer.lora_up.double().t()
    if layer.bias is not None:
        ref += layer.bias.double()
    if gelu_from is not None:
        ref[:, gelu_from:] = gelu_tanh64(ref[:, gelu_from:])
    return y, ref


@needs_sm80
@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097, 4608])
@pytest.mark.parametrize("rank", [32, 160])
def test_sm80_whole_k_gemm_matches_float64(m, rank):
    generator = gen(3000 + m + rank)
    layer = w4a4_layer(384, 576, rank, torch.bfloat16, generator, unsigned=False, pow2_weights=True)
    x = activations(m, 576, torch.bfloat16, generator, layer.unsigned_groups)
    y, ref = _sm80_whole_k_run(x, layer)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm80
@pytest.mark.parametrize("n,k,rank,dtype,unsigned,bias", SM80_AWKWARD_SHAPES)
def test_sm80_whole_k_gemm_awkward_shapes(n, k, rank, dtype, unsigned, bias):
    generator = gen(3 * n + k + rank)
    layer = w4a4_layer(n, k, rank, dtype, generator, unsigned, bias, pow2_weights=True)
    x = activations(300, k, dtype, generator, layer.unsigned_groups)
    y, ref = _sm80_whole_k_run(x, layer)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)


@needs_sm80
@pytest.mark.parametrize("gelu_from", [0, 136, 384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm80_whole_k_gemm_epilogue_gelu(gelu_from, dtype):
    generator = gen(6000 + gelu_from)
    layer = w4a4_layer(384, 576, 32, dtype, generator, unsigned=True, pow2_weights=True)
    x = activations(300, 576, dtype, generator, layer.unsigned_groups)
    y, ref = _sm80_whole_k_run(x, layer, gelu_from=gelu_from)
    assert rel(y, ref.to(y.dtype)) <= 1e-3, rel(y, ref)
    _check_gelu_tail(y, ref, gelu_from)


@needs_sm80
@pytest.mark.parametrize("m,batches", [(1, 1), (255, 1), (4097, 1), (600, 2), (4608, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["int4", "int8", "whole-k", "whole-k stream-k"])
@pytest.mark.parametrize("in_place", [False, True])
def test_sm80_gemm_epilogue_gated_residual(m, batches, dtype, path, in_place):
    # both kernel 2s with a kernels.GatedResidual (_check_gated_residual), with a GELU on part of the channels;
    # stream-K: 3 slices (the tile's last CTA runs the epilogue)
    generator = gen(5200 + m + batches)
    whole_k = path.startswith("whole-k")
    layer = w4a4_layer(392, 576, 32, dtype, generator, unsigned=False, pow2_weights=whole_k)
    kernel = layer.w4a4_kernel()
    x = activations(m, 576, dtype, generator, layer.unsigned_groups)
    residual = (torch.randn(m, 392, generator=generator, device=DEV) * 4).to(dtype)
    gate = (torch.randn(batches, 392, generator=generator, device=DEV)).to(dtype)
    smooth, inv_smooth, group_shift, lora_t = sm80.kernel1_inputs(kernel)
    codes, ascales, lora_act = sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=whole_k,
                                              int8_operands=whole_k)

    def kernel2(out, gated):
        if whole_k:
            wexp, wbase = sm80.pow2_weight_operands(kernel)
            return sm80.w4a4_gemm_pow2(codes, ascales, layer.qweight, wexp, wbase, dtype, lora_act,
                                       sm80.padded_lora_up(kernel), layer.bias, out, 136,
                                       3 if path.endswith("stream-k") else None, residual=gated)
        return sm80.w4a4_gemm(codes, ascales, group_shift, layer.qweight, layer.wscales, lora_act,
                              sm80.padded_lora_up(kernel), layer.bias, out, 136, path, gated)

    _check_gated_residual(kernel2, residual, gate, in_place)


# ---- sm80: the whole-K kernel 2's stream-K split (w4a4_gemm_pow2.cu's work split) ----------------

@pytest.mark.parametrize("tiles,groups,slots,splits,plan", [
    (864, 48, 264, None, (792, 3)),    # M = 4608, N = 3072 on an H100 (132 SMs x 2): 72 tiles after 3 waves
    (3456, 48, 264, None, (3432, 4)),  # N = 12288: 24 tiles after 13 waves; 11 slices would fit, at most 4
    (2592, 48, 264, None, (2592, 1)),  # N = 9216: the last wave 82% full
    (792, 48, 264, None, (792, 1)),    # whole waves
    (48, 48, 264, None, (0, 4)),       # one partial wave (M = 255): every tile
    (864, 9, 264, None, (792, 2)),     # 9 groups: slices of at least 4
    (864, 7, 264, None, (864, 1)),     # too few groups for two such slices
    (792, 48, 264, 3, (528, 3)),       # forced: over the last whole wave
    (864, 2, 264, 5, (792, 2)),        # forced: at most one slice per group
    (864, 48, 264, 1, (864, 1)),       # forced off
    (0, 48, 264, None, (0, 1)),
    (5000, 48, 10000, None, (5000, 1)),  # more tiles in the last wave than the kernel has counters
])
def test_sm80_stream_k_plan(tiles, groups, slots, splits, plan):
    assert sm80.stream_k_plan(tiles, groups, slots, splits) == plan


def _sm80_whole_k_stream_k_outputs(m: int, layer: SVDQLinear, generator: torch.Generator, splits: int | None,
                                   gelu_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-K kernel 2 on one kernel 1 output, with stream-K (splits: forced, or None: the host's
    choice) and without, each into a poisoned output."""
    kernel = layer.w4a4_kernel()
    x = activations(m, layer.in_features, layer.wscales.dtype, generator, layer.unsigned_groups)
    smooth, inv_smooth, group_shift, lora_t = sm80.kernel1_inputs(kernel)
    codes, atok, lora_act = sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=True, int8_operands=True)
    if layer.rank > kernels.KERNEL1_MAX_RANK:
        lora_act = torch.nn.functional.pad(x @ layer.lora_down, (0, -layer.rank % kernels.RANK_MULTIPLE)).contiguous()
    wexp, wbase = sm80.pow2_weight_operands(kernel)
    ys = []
    for stream_k in (splits, 1):
        out = torch.full((m, layer.out_features), float("nan"), dtype=x.dtype, device=DEV)
        ys.append(sm80.w4a4_gemm_pow2(codes, atok, layer.qweight, wexp, wbase, x.dtype, lora_act,
                                      sm80.padded_lora_up(kernel), layer.bias, out, gelu_from, stream_k))
    torch.cuda.synchronize()
    assert bool(torch.isfinite(ys[1]).all()), f"{int((~torch.isfinite(ys[1])).sum())} outputs unwritten or not finite"
    return ys[0], ys[1]


@needs_sm80
@pytest.mark.parametrize("m", [1, 255, 4097, 4608])
@pytest.mark.parametrize("n,k", [(3072, 3072), (136, 3072), (3072, 12288)])
@pytest.mark.parametrize("splits", [None, 2, 3, 5])
def test_sm80_whole_k_stream_k_is_bit_exact(m, n, k, splits):
    # 5 slices: 9-10 of K = 3072's 48 groups, 38-39 of 12288's 192; N = 136: the second channel tile holds
    # 8 channels; M = 4097: its last token tile one token; splits=None: 4608 x 3072 takes 3
    if sm80.whole_k_work_split(m, n, k, torch.device(DEV), splits)[2] == 1:
        pytest.skip("no stream-K tiles at this size on this GPU (whole waves)")
    generator = gen(7000 + m + n + k + (splits or 0))
    layer = w4a4_layer(n, k, 32, torch.bfloat16, generator, unsigned=True, pow2_weights=True)
    y_stream_k, y = _sm80_whole_k_stream_k_outputs(m, layer, generator, splits)
    assert torch.equal(y_stream_k, y)


@needs_sm80
@pytest.mark.parametrize("rank", [0, 32, 160])
@pytest.mark.parametrize("gelu_from", [None, 0, 136])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm80_whole_k_stream_k_epilogue(rank, gelu_from, dtype):
    # 3 x 3 tiles, all of them stream-K (fewer than a wave), 3 slices of 3 groups each; rank 160:
    # lora_act from cuBLAS; GELU from inside the second channel tile
    generator = gen(8000 + rank + (gelu_from or 0) + (dtype == torch.float16))
    layer = w4a4_layer(384, 576, rank, dtype, generator, unsigned=False, pow2_weights=True)
    y_stream_k, y = _sm80_whole_k_stream_k_outputs(300, layer, generator, 3, gelu_from)
    assert torch.equal(y_stream_k, y)


@needs_sm80
@pytest.mark.parametrize("stream_k", [0, -2, True, 2.0])
def test_sm80_whole_k_stream_k_argument_is_checked(stream_k):
    layer = w4a4_layer(64, 128, 0, torch.bfloat16, gen(11), unsigned=False, pow2_weights=True)
    kernel = layer.w4a4_kernel()
    codes, atok, _ = sm80.act_quant(torch.ones(4, 128, device=DEV, dtype=torch.bfloat16), *sm80.kernel1_inputs(kernel),
                                    pow2=True, int8_operands=True)
    wexp, wbase = sm80.pow2_weight_operands(kernel)
    with pytest.raises(sm80.Sm80InputError, match="stream_k must be None or a positive int"):
        sm80.w4a4_gemm_pow2(codes, atok, layer.qweight, wexp, wbase, torch.bfloat16, None, None, stream_k=stream_k)


@needs_sm80
def test_sm80_bad_inputs_raise_named_errors():
    layer = w4a4_layer(64, 128, 32, torch.bfloat16, gen(9), unsigned=False)
    smooth, inv_smooth, group_shift, lora_t = sm80.kernel1_inputs(layer.w4a4_kernel())
    with pytest.raises(sm80.Sm80InputError, match="input width 100 is not a positive multiple of 64"):
        sm80.act_quant(torch.zeros(4, 100, device=DEV, dtype=torch.bfloat16), smooth, inv_smooth, group_shift, lora_t)
    codes, ascales, lora_act = sm80.act_quant(torch.ones(4, 128, device=DEV, dtype=torch.bfloat16), smooth,
                                              inv_smooth, group_shift, lora_t)
    with pytest.raises(sm80.Sm80InputError, match=r"wscales must have shape \[2, 64\], got \[2, 32\]"):
        sm80.w4a4_gemm(codes, ascales, group_shift, layer.qweight, layer.wscales[:, :32].contiguous(), lora_act,
                       layer.lora_up)
    with pytest.raises(sm80.Sm80InputError, match="mma must be one of"):
        sm80.w4a4_gemm(codes, ascales, group_shift, layer.qweight, layer.wscales, lora_act, layer.lora_up, mma="fp8")
    with pytest.raises(sm80.Sm80InputError, match="output width 60 is not a multiple of 8"):
        sm80.w4a4_gemm(codes, ascales, group_shift, layer.qweight[:60].contiguous(),
                       layer.wscales[:, :60].contiguous(), None, None)
    with pytest.raises(sm80.Sm80InputError, match="int8_operands needs pow2 activation scales"):
        sm80.act_quant(torch.ones(4, 128, device=DEV, dtype=torch.bfloat16), smooth, inv_smooth, group_shift, lora_t,
                       int8_operands=True)
    with pytest.raises(sm80.Sm80InputError, match="not power-of-two fractions"):
        sm80.pow2_weight_operands(layer.w4a4_kernel())
    pow2_layer = w4a4_layer(64, 128, 32, torch.bfloat16, gen(10), unsigned=False, pow2_weights=True)
    wexp, wbase = sm80.pow2_weight_operands(pow2_layer.w4a4_kernel())
    codes8, atok, lora_act = sm80.act_quant(torch.ones(4, 128, device=DEV, dtype=torch.bfloat16), smooth,
                                            inv_smooth, group_shift, lora_t, pow2=True, int8_operands=True)
    with pytest.raises(sm80.Sm80InputError, match=r"wexp must have shape \[2, 64\], got \[2, 48\]"):
        sm80.w4a4_gemm_pow2(codes8, atok, pow2_layer.qweight, wexp[:, :48].contiguous(), wbase, torch.bfloat16,
                            lora_act, pow2_layer.lora_up)
    with pytest.raises(sm80.Sm80InputError, match=r"atok must have shape \[1, 4\]"):
        sm80.w4a4_gemm_pow2(codes8, ascales, pow2_layer.qweight, wexp, wbase, torch.bfloat16, lora_act,
                            pow2_layer.lora_up)
