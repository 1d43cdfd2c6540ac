"""The numerical definition: packing, group quantizers, the W4A4 product and the modules."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdquant import numerics
from svdquant.linear import SVDQLinear, W4A16Linear


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), pairs=st.integers(1, 40), signed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(rows, pairs, signed, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (rows, 2 * pairs), generator=gen, dtype=torch.int8)
    packed = numerics.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, pairs)
    assert torch.equal(numerics.unpack_int4(packed, signed=signed).to(torch.int8), codes)


def test_pack_layout_and_edges():
    codes = torch.tensor([[-8, 7, 0, -1, 7, -8]], dtype=torch.int8)
    packed = numerics.pack_int4(codes)
    # low nibble is the even column, two's complement
    assert packed.tolist() == [[0x78, 0xF0, 0x87]]
    assert torch.equal(numerics.unpack_int4(packed, signed=True), codes)
    unsigned = torch.tensor([[0, 15, 15, 0]], dtype=torch.uint8)
    assert numerics.pack_int4(unsigned).tolist() == [[0xF0, 0x0F]]
    with pytest.raises(ValueError, match="odd"):
        numerics.pack_int4(torch.zeros(1, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="INT4"):
        numerics.pack_int4(torch.tensor([[16, 0]]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_signed_group_quantizer_rules(dtype):
    x = torch.randn(9, 192) * torch.logspace(-3, 2, 192)
    x[3, 64:128] = 0.0  # an all-zero group
    codes, scales = numerics.quantize_groups(x, scale_dtype=dtype)
    assert codes.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (9, 3)
    amax = x.reshape(9, 3, 64).abs().amax(-1)
    assert torch.equal(scales, (amax / 7).to(dtype))
    assert int(codes.min()) >= -7 and int(codes.max()) <= 7
    # the largest element of each non-zero group maps to +-7
    assert torch.equal(codes.reshape(9, 3, 64).abs().amax(-1)[amax > 0], torch.full_like(amax[amax > 0], 7, dtype=torch.int8))
    assert scales[3, 1] == 0 and not codes[3, 64:128].any()
    # each element is within half a step (plus the scale's own rounding) of its dequantized value
    deq = numerics.dequantize_groups(codes, scales)
    step = scales.float().repeat_interleave(64, dim=1)
    assert bool(((deq - x).abs() <= 0.5 * step + 7 * step * 2**-8 + 1e-12).all())


def test_unsigned_group_quantizer_rules():
    x = torch.rand(4, 128) * 3
    x[:, :64] -= 1.5  # first group signed, second unsigned
    unsigned = torch.tensor([False, True])
    codes, scales = numerics.quantize_groups(x, unsigned)
    assert torch.equal(scales[:, 1], (x[:, 64:].amax(-1) / 15).to(torch.bfloat16))
    assert int(codes[:, 64:].min()) >= 0 and int(codes[:, 64:].max()) == 15
    assert int(codes[:, :64].min()) >= -7 and int(codes[:, :64].max()) <= 7
    # negative values in an unsigned group clamp to 0
    y = torch.full((1, 64), 2.0)
    y[0, 0] = -0.1
    c, _ = numerics.quantize_groups(y, True)
    assert c[0, 0] == 0


def test_rounding_is_half_to_even():
    # scale 1 (amax 7): codes are rint(x) exactly
    x = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5] + [0.0] * 57])
    codes, scales = numerics.quantize_groups(x, scale_dtype=torch.float32)
    assert float(scales) == 1.0
    assert codes[0, :7].tolist() == [7, 0, 2, 2, 0, -2, -2]


def test_group_width_must_divide():
    with pytest.raises(ValueError, match="multiple"):
        numerics.quantize_groups(torch.randn(2, 100))


def _random_w4a4(n, k, rank, shift_groups=(), seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    tensors = {
        "qweight": numerics.pack_int4(codes),
        "wscales": (torch.rand(k // 64, n, generator=gen) * 0.01 + 1e-3).to(dtype),
        "smooth": (torch.rand(k, generator=gen) + 0.5).to(dtype),
        "lora_down": (torch.randn(k, rank, generator=gen) * 0.05).to(dtype),
        "lora_up": (torch.randn(n, rank, generator=gen) * 0.05).to(dtype),
        "bias": torch.randn(n, generator=gen).to(dtype),
    }
    if shift_groups:
        shift = torch.zeros(k)
        for g in shift_groups:
            shift[64 * g:64 * (g + 1)] = numerics.GELU_SHIFT
        tensors["shift"] = shift.to(dtype)
    return codes, tensors


def _float64_svdq(x, codes, t):
    """Dequantize-then-matmul in float64 from the reference activation codes."""
    shift = t.get("shift")
    unsigned = numerics.unsigned_groups_from_shift(shift, x.shape[-1])
    qa, sa = numerics.quantize_activations(x, t["smooth"], shift, unsigned)
    a = qa.double() * sa.double().repeat_interleave(64, dim=-1)
    w = codes.double() * t["wscales"].double().t().repeat_interleave(64, dim=1)
    lowrank = (x.double() @ t["lora_down"].double()) @ t["lora_up"].double().t()
    return a @ w.t() + lowrank + t["bias"].double()


@pytest.mark.parametrize("shift_groups", [(), (1, 2)])
def test_svdq_linear_matches_float64_reference(shift_groups):
    n, k, rank = 136, 192, 32
    codes, tensors = _random_w4a4(n, k, rank, shift_groups)
    layer = SVDQLinear.from_tensors(tensors)
    assert layer.unsigned_groups.tolist() == [g in shift_groups for g in range(3)]
    x = torch.randn(2, 13, k) * 2
    x[..., 5] *= 60  # an outlier channel
    if shift_groups:
        x[..., 64:] = torch.nn.functional.gelu(x[..., 64:], approximate="tanh")
    y = layer(x)
    assert y.shape == (2, 13, n) and y.dtype == torch.float32
    ref = _float64_svdq(x.reshape(-1, k), codes, tensors).reshape(2, 13, n)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5
    # bf16 in, bf16 out, same numbers up to bf16 rounding of the input and output
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    ref16 = _float64_svdq(x.bfloat16().reshape(-1, k), codes, tensors).reshape(2, 13, n)
    assert float((y16.double() - ref16).norm() / ref16.norm()) < 1e-2


def test_svdq_linear_load_checks_shapes():
    _, tensors = _random_w4a4(128, 128, 16)
    layer = SVDQLinear(128, 128, rank=0)
    layer.load_state_dict(tensors)  # the rank is taken from the state dict
    assert layer.rank == 16
    bad = dict(tensors, wscales=tensors["wscales"][:1])
    with pytest.raises(RuntimeError, match="wscales"):
        SVDQLinear(128, 128).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="qweight"):
        SVDQLinear(128, 128).load_state_dict({k: v for k, v in tensors.items() if k != "qweight"})


def test_w4a16_linear_matches_float64_reference():
    w = torch.randn(96, 128) * 0.05
    codes, wscales, wzeros = numerics.quantize_w4a16(w)
    assert int(codes.max()) <= 15 and codes.dtype == torch.uint8
    dense = codes.double() * wscales.double().t().repeat_interleave(64, 1) + wzeros.double().t().repeat_interleave(64, 1)
    # min/max quantization: every weight within one step of its value
    assert bool(((dense - w.double()).abs() <= wscales.double().t().repeat_interleave(64, 1) + 1e-6).all())
    bias = torch.randn(96)
    layer = W4A16Linear.from_tensors({"qweight": numerics.pack_int4(codes), "wscales": wscales, "wzeros": wzeros,
                                      "bias": bias.bfloat16()})
    x = torch.randn(3, 5, 128)
    y = layer(x)
    ref = x.double() @ dense.t() + bias.bfloat16().double()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pow2_activation_quantizer_rules(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 640, generator=gen) * torch.logspace(-4, 1, 640)
    x[2] = 0.0                 # an all-zero token
    x[3, 128:192] = 0.0        # an all-zero group
    unsigned = torch.arange(10) % 3 == 1
    x[:, 64:128] = x[:, 64:128].abs()
    codes, top, exps = numerics.quantize_groups_pow2(x, unsigned, scale_dtype=dtype)
    assert codes.dtype == torch.int8 and top.dtype == dtype and exps.dtype == torch.uint8
    assert top.shape == (6,) and exps.shape == (6, 10)
    v = torch.where(unsigned.repeat_interleave(64), x.clamp_min(0), x).reshape(6, 10, 64)
    qmax = torch.where(unsigned, 15.0, 7.0)
    need = v.abs().amax(-1) / qmax
    assert torch.equal(top, need.amax(-1).to(dtype))
    scales = numerics.pow2_scales(top, exps)
    # the largest e in [0, 3] whose scale still covers the group, or 0 when none does
    assert int(exps.max()) <= numerics.POW2_ACT_MAX_EXP
    covered = scales >= need
    assert bool((covered | (exps == 0)).all())
    finer = top.float()[:, None] * torch.exp2(-(exps.float() + 1))
    assert bool(((finer < need) | (exps == numerics.POW2_ACT_MAX_EXP)).all())
    assert int(exps[3, 2]) == numerics.POW2_ACT_MAX_EXP and not codes[3, 128:192].any()
    assert top[2] == 0 and not codes[2].any()
    # codes agree with the plain quantizer's rule at these scales; the operand code * 2^-e is exact in e4m3
    lo = torch.where(unsigned, 0.0, -8.0).repeat_interleave(64)
    hi = torch.where(unsigned, 15.0, 7.0).repeat_interleave(64)
    assert bool((codes >= lo).all() and (codes <= hi).all())
    operand = codes.float() * torch.exp2(-exps.float()).repeat_interleave(64, dim=1)
    assert torch.equal(operand.to(torch.float8_e4m3fn).float(), operand)
    deq = numerics.dequantize_groups(codes, scales)
    step = scales.repeat_interleave(64, dim=1)
    vv = v.reshape(6, 640)
    assert bool(((deq - vv).abs() <= 0.5 * step * (1 + 2**-7) + 1e-30).all())


def test_pow2_rows_below_the_smallest_base_quantize_to_zero():
    # 1 / top must stay finite after the 2^e factor; such rows carry no signal in 16-bit anyway
    x = torch.full((2, 64), 3.0)
    x[1] *= 2.0**-104
    codes, top, _ = numerics.quantize_groups_pow2(x, scale_dtype=torch.float32)
    assert top[1] > 0 and top[1] < numerics.POW2_MIN_BASE
    assert bool((codes[0] == 7).all()) and not codes[1].any()


def test_pow2_operands_are_exact_in_e4m3_and_s8():
    codes = torch.arange(-8, 16, dtype=torch.float32)
    for e in range(numerics.POW2_ACT_MAX_EXP + 1):
        value = codes * 2.0 ** -e  # the design (d) kernel's FP8 activation operand
        assert torch.equal(value.to(torch.float8_e4m3fn).float(), value)
        s8 = codes * 2 ** (numerics.POW2_ACT_MAX_EXP - e)  # the fast kernel's activation operand
        assert int(s8.min()) >= -128 and int(s8.max()) <= 127
    weights = torch.arange(-8, 8)
    for f in range(numerics.POW2_WEIGHT_MAX_EXP + 1):
        s8 = weights * 2 ** (numerics.POW2_WEIGHT_MAX_EXP - f)
        assert int(s8.min()) >= -128 and int(s8.max()) <= 127


def test_pow2_activations_of_layer_input():
    x = (torch.randn(5, 256) * 3).bfloat16()
    smooth = (torch.rand(256) + 0.5).bfloat16()
    shift = torch.zeros(256)
    shift[128:] = numerics.GELU_SHIFT
    codes, atok, exps = numerics.quantize_activations_pow2(x, smooth, shift.bfloat16())
    v = (x.float() + shift.bfloat16().float()) * torch.reciprocal(smooth.float())
    ref = numerics.quantize_groups_pow2(v, torch.tensor([False, False, True, True]), scale_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip((codes, atok, exps), ref))


def test_pow2_weight_exponents_detection():
    base = torch.tensor([0.5, 0.0, 3.0, 1.0])
    exps = torch.tensor([[0, 0, 2, 4], [3, 0, 0, 0], [4, 0, 1, 4]])
    wscales = (base * torch.exp2(-exps.float())).bfloat16()
    wscales[:, 1] = 0.0  # an all-zero row
    got = numerics.pow2_weight_exponents(wscales)
    assert got is not None
    assert torch.equal(got[0], base) and torch.equal(got[1], exps.to(torch.uint8))
    not_pow2 = wscales.clone()
    not_pow2[1, 0] = 0.3
    assert numerics.pow2_weight_exponents(not_pow2) is None
    too_far = wscales.clone()
    too_far[2, 3] = 2.0 ** -5  # 2^-5 of the row's base 1
    assert numerics.pow2_weight_exponents(too_far) is None
    zero_group = wscales.clone()
    zero_group[0, 0] = 0.0
    assert numerics.pow2_weight_exponents(zero_group) is None
