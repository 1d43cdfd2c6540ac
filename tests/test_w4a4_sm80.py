"""Tests of the sm80 W4A4 family (csrc/sm80, svdquant/families/sm80.py) against `numerics`.

Run on any sm_80+ GPU (both kernel 2 variants are forced; the H100 emulates INT4 mma.sync, slowly
but exactly). Kernel 1's packed codes and its scales must equal numerics.quantize_activations
(pow2 mode: numerics.quantize_activations_pow2 and its scales atok * 2^-e) bit for bit; kernel 2 is
compared with a float64 evaluation of the same codes, scales and low-rank inputs (1e-3).
"""

from __future__ import annotations

import pytest
import torch

from svdquant import kernels, numerics
from svdquant.families import sm80
from svdquant.linear import SVDQLinear

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)),
                                reason="needs an sm_80 or newer GPU")

DEV = "cuda"
G = numerics.GROUP_SIZE


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _activations(m: int, k: int, dtype: torch.dtype, gen: torch.Generator, unsigned: torch.Tensor) -> torch.Tensor:
    """Random activations with planted outliers (hot channels x30, single spikes x100, a few exact
    zeros); unsigned groups get post-GELU values (>= -GELU_SHIFT, as the shifted layers see)."""
    x = torch.randn(m, k, generator=gen, device=DEV)
    hot = torch.randint(0, k, (max(1, k // 64),), generator=gen, device=DEV)
    x[:, hot] *= 30.0
    spikes = torch.randint(0, m * k, (max(1, m * k // 5000),), generator=gen, device=DEV)
    x.view(-1)[spikes] *= 100.0
    zeros = torch.randint(0, m * k, (max(1, m * k // 3000),), generator=gen, device=DEV)
    x.view(-1)[zeros] = 0.0
    cols = unsigned.to(DEV).repeat_interleave(G)
    x[:, cols] = torch.nn.functional.gelu(x[:, cols], approximate="tanh")
    return x.to(dtype)


def _layer(n: int, k: int, rank: int, dtype: torch.dtype, gen: torch.Generator, unsigned: bool,
           bias: bool = True) -> SVDQLinear:
    groups = k // G
    tensors = {
        "qweight": torch.randint(0, 256, (n, k // 2), generator=gen, device=DEV, dtype=torch.uint8),
        "wscales": (torch.rand(groups, n, generator=gen, device=DEV) * 0.02 + 1e-3).to(dtype),
        "smooth": (torch.rand(k, generator=gen, device=DEV) * 4 + 0.05).to(dtype),
        "lora_down": (torch.randn(k, rank, generator=gen, device=DEV) * 0.05).to(dtype),
        "lora_up": (torch.randn(n, rank, generator=gen, device=DEV) * 0.05).to(dtype),
    }
    if bias:
        tensors["bias"] = torch.randn(n, generator=gen, device=DEV).to(dtype)
    if unsigned:  # every other group shifted (unsigned), the rest signed
        flags = torch.arange(groups, device=DEV) % 2 == 1
        tensors["shift"] = (flags.repeat_interleave(G) * numerics.GELU_SHIFT).to(dtype)
    return SVDQLinear.from_tensors(tensors)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _unpack_act(codes: torch.Tensor, unsigned_groups: torch.Tensor) -> torch.Tensor:
    """Kernel 1's packed codes [M, K/2] -> int8 [M, K] (unsigned groups without sign extension)."""
    signed = numerics.unpack_int4(codes, signed=True)
    plain = numerics.unpack_int4(codes, signed=False)
    return torch.where(unsigned_groups.to(codes.device).repeat_interleave(G), plain, signed)


def _kernel1(x: torch.Tensor, layer: SVDQLinear, pow2: bool):
    """Kernel 1 with the layer's inputs (ranks above KERNEL1_MAX_RANK: none, as svdq_linear runs it)."""
    smooth, inv_smooth, group_shift, lora_t = sm80.layer_inputs(layer)
    return sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2)


@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("k,rank", [(128, 32), (320, 16), (1600, 24), (576, 0)])
@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_matches_reference(m, dtype, unsigned, k, rank, pow2):
    # rank 24: lora_down padded to 32 ranks with zero rows (two warps, the second half empty)
    gen = _gen(m * 7 + rank + unsigned + k + 11 * pow2)
    layer = _layer(64, k, rank, dtype, gen, unsigned)
    x = _activations(m, k, dtype, gen, layer.unsigned_groups)
    codes, ascales, lora_act = _kernel1(x, layer, pow2)
    torch.cuda.synchronize()
    if pow2:
        ref_codes, ref_atok, ref_exps = numerics.quantize_activations_pow2(x, layer.smooth, layer.shift)
        ref_scales = numerics.pow2_scales(ref_atok, ref_exps)
    else:
        ref_codes, ref_scales = numerics.quantize_activations(x, layer.smooth, layer.shift)
    ref_packed = numerics.pack_int4(ref_codes)
    mismatch = (codes != ref_packed).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} code bytes differ, first at {mismatch[:5].tolist()}"
    assert torch.equal(ascales[:, :m].t(), ref_scales.float())
    if rank:
        ref_lora = x.double() @ layer.lora_down.double()
        assert lora_act.shape == (m, 32 if rank == 24 else rank)
        assert _rel(lora_act[:, :rank], ref_lora.to(dtype)) <= 1e-3
        assert bool((lora_act[:, rank:] == 0).all())
    else:
        assert lora_act is None


def _gemm_reference(codes, ascales, lora_act, layer: SVDQLinear, gelu_from: int | None = None) -> torch.Tensor:
    """float64 evaluation of kernel 2 on kernel 1's outputs."""
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
        v = y[:, gelu_from:]
        y[:, gelu_from:] = 0.5 * v * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (v + 0.044715 * v ** 3)))
    return y


def _run_gemm(x: torch.Tensor, layer: SVDQLinear, mma: str, pow2: bool = False, gelu_from: int | None = None):
    """Kernels 1 and 2 (as svdq_linear runs them) on a poisoned output; returns (y, float64 reference)."""
    smooth, inv_smooth, group_shift, lora_t = sm80.layer_inputs(layer)
    codes, ascales, lora_act = sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2)
    if layer.rank > sm80.KERNEL1_MAX_RANK:
        lora_act = torch.nn.functional.pad(x @ layer.lora_down, (0, -layer.rank % sm80.RANK_STEP)).contiguous()
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=DEV)
    y = sm80.w4a4_gemm(codes, ascales, group_shift, layer.qweight, layer.wscales, lora_act, sm80._lora_up(layer),
                       layer.bias, out, gelu_from, mma)
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    assert bool(torch.isfinite(y).all()), f"{int((~torch.isfinite(y)).sum())} outputs unwritten or not finite"
    return y, _gemm_reference(codes, ascales, lora_act, layer, gelu_from)


@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097, 4608])
@pytest.mark.parametrize("rank", [32, 160])
@pytest.mark.parametrize("pow2", [False, True])
def test_gemm_matches_float64(mma, m, rank, pow2):
    gen = _gen(1000 + m + rank + pow2)
    layer = _layer(384, 576, rank, torch.bfloat16, gen, unsigned=False)
    x = _activations(m, 576, torch.bfloat16, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, mma, pow2)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)


@pytest.mark.parametrize("n,k,rank,dtype,unsigned,bias", [
    (8, 64, 16, torch.bfloat16, False, True),       # one group, one 8-channel slice of a tile
    (136, 192, 24, torch.float16, True, False),     # a second channel tile with 8 channels; rank padded
    (1000, 640, 48, torch.bfloat16, True, True),    # partial last tile, rank above kernel 1's
    (520, 1024, 0, torch.float16, False, True),     # no low-rank branch
])
@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
def test_gemm_awkward_shapes(n, k, rank, dtype, unsigned, bias, mma):
    gen = _gen(n + k + rank)
    layer = _layer(n, k, rank, dtype, gen, unsigned, bias)
    x = _activations(300, k, dtype, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, mma, pow2=unsigned)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)


@pytest.mark.parametrize("gelu_from", [0, 136, 384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
def test_gemm_epilogue_gelu(gelu_from, dtype, mma):
    # 0: all channels (an MLP's first layer); 136: from inside the second channel tile; 384 = N: none
    gen = _gen(5000 + gelu_from)
    layer = _layer(384, 576, 32, dtype, gen, unsigned=False)
    x = _activations(300, 576, dtype, gen, layer.unsigned_groups)
    y, ref = _run_gemm(x, layer, mma, gelu_from=gelu_from)
    assert _rel(y, ref.to(y.dtype)) <= 1e-3, _rel(y, ref)
    neg = ref[:, gelu_from:] < -1e-2  # GELU's negative tail, to the output dtype's precision
    assert bool(neg.any()) == (gelu_from < 384)
    tail = (y[:, gelu_from:][neg].double() - ref[:, gelu_from:][neg]).abs() / ref[:, gelu_from:][neg].abs()
    assert tail.numel() == 0 or float(tail.max()) <= (2 ** -7 if dtype == torch.bfloat16 else 2 ** -9)


@pytest.mark.parametrize("mma", sm80.MMA_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned,pow2,rank", [(False, False, 32), (True, True, 32), (True, False, 160)])
def test_svdq_linear_matches_reference_path(mma, dtype, unsigned, pow2, rank):
    gen = _gen(7 + unsigned + rank)
    layer = _layer(256, 512, rank, dtype, gen, unsigned)
    layer.gelu_from = 128
    x = _activations(154, 512, dtype, gen, layer.unsigned_groups)
    y = sm80.svdq_linear(x, layer, mma=mma, pow2_activations=pow2)
    ref = kernels.svdq_linear_reference(x, layer.qweight, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                        layer.bias, layer.shift, layer.unsigned_groups, pow2, gelu_from=128)
    assert y.shape == ref.shape and y.dtype == dtype
    # the kernels round lora_act to the 16-bit dtype before the up projection; the reference keeps fp32
    assert _rel(y, ref) <= 5e-3, _rel(y, ref)


def test_layer_caches_follow_the_tensors():
    gen = _gen(3)
    layer = _layer(64, 128, 16, torch.bfloat16, gen, unsigned=False)
    first = sm80.layer_inputs(layer)
    assert sm80.layer_inputs(layer) is first
    layer.lora_down.mul_(2)  # an in-place edit (a LoRA strength) bumps the version
    assert torch.equal(sm80.layer_inputs(layer)[3][:16], layer.lora_down.t())


def test_bad_inputs_raise_named_errors():
    gen = _gen(9)
    layer = _layer(64, 128, 32, torch.bfloat16, gen, unsigned=False)
    smooth, inv_smooth, group_shift, lora_t = sm80.layer_inputs(layer)
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
