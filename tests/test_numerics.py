"""The numerical definition's building blocks: packing, the group quantizers, the power-of-two weight
scales. Each op's own definition is tested with its kernels: tests/test_act_quant.py (activation
quantization), tests/test_w4a4_gemm.py (the W4A4 product's operands), tests/test_svdq_linear.py (the W4A4
layer), tests/test_w4a16.py (the W4A16 layer)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdquant import numerics


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
