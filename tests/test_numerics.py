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


# ---- the group rotation ---------------------------------------------------------------------------

def test_hadamard_rotation_is_the_orthonormal_walsh_hadamard_matrix_exactly():
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < 64:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    m = numerics.rotation_matrix(numerics.hadamard_rotation())
    assert torch.equal(m, sylvester / 8) and torch.equal(m @ m.t(), torch.eye(64, dtype=torch.float64))


def test_butterfly_rotation_is_orthogonal_and_angle_zero_is_the_identity():
    angles = torch.rand(numerics.ROTATION_STAGES, 32, generator=torch.Generator().manual_seed(3)) * 6.3
    m = numerics.rotation_matrix(numerics.butterfly_rotation(angles))
    assert torch.allclose(m @ m.t(), torch.eye(64, dtype=torch.float64), atol=1e-6)
    assert not torch.allclose(m.abs(), torch.full((64, 64), 0.125, dtype=torch.float64), atol=1e-2)
    identity = numerics.rotation_matrix(numerics.butterfly_rotation(torch.zeros(numerics.ROTATION_STAGES, 32)))
    assert torch.equal(identity, torch.eye(64, dtype=torch.float64))


def test_rotate_groups_turns_only_the_chosen_groups_by_the_matrix():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(7, 256, generator=gen) * torch.exp(torch.randn(256, generator=gen))
    rotation = numerics.butterfly_rotation(torch.rand(numerics.ROTATION_STAGES, 32, generator=gen) * 6.3)
    chosen = torch.tensor([True, False, True, False])
    out = numerics.rotate_groups(v, rotation, chosen)
    m = numerics.rotation_matrix(rotation)
    for g in range(4):
        cols = slice(64 * g, 64 * g + 64)
        if chosen[g]:
            ref = v[:, cols].double() @ m
            assert torch.allclose(out[:, cols].double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
        else:
            assert torch.equal(out[:, cols], v[:, cols])


def test_rotate_groups_rounds_each_product_and_sum_once():
    """Stage s: fl(fl(a * v[i]) + fl(b * v[i ^ 2^s])) in float32, what kernel 1 computes without FMA:
    one column followed through the six stages in float64 with a rounding to float32 after each
    operation."""
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(3, 64, generator=gen)
    rotation = numerics.butterfly_rotation(torch.rand(numerics.ROTATION_STAGES, 32, generator=gen) * 6.3)
    out = numerics.rotate_groups(v, rotation, torch.tensor([True]))

    def f32(t):
        return t.float().double()

    w = v.double()
    for s in range(numerics.ROTATION_STAGES):
        partner = w[:, torch.arange(64) ^ (1 << s)]
        coef = rotation[s].double()
        w = f32(f32(coef[:, 0] * w) + f32(coef[:, 1] * partner))
    assert torch.equal(out, w.float())


def test_rotated_activation_quantizers_rotate_signed_groups_only():
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(9, 256, generator=gen) * 3).bfloat16()
    smooth = (torch.rand(256, generator=gen) + 0.5).bfloat16()
    shift = torch.zeros(256)
    shift[128:] = numerics.GELU_SHIFT
    shift = shift.bfloat16()
    rotation = numerics.hadamard_rotation()
    unsigned = torch.tensor([False, False, True, True])
    codes, scales = numerics.quantize_activations(x, smooth, shift, rotation=rotation)
    v = (x.float() + shift.float()) / smooth.float()
    ref = numerics.quantize_groups(numerics.rotate_groups(v, rotation, ~unsigned), unsigned, torch.bfloat16)
    assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1])
    plain_codes, _ = numerics.quantize_activations(x, smooth, shift)
    assert torch.equal(codes[:, 128:], plain_codes[:, 128:]) and not torch.equal(codes[:, :128], plain_codes[:, :128])
    pow2 = numerics.quantize_activations_pow2(x, smooth, shift, rotation=rotation)
    v = (x.float() + shift.float()) * torch.reciprocal(smooth.float())
    ref = numerics.quantize_groups_pow2(numerics.rotate_groups(v, rotation, ~unsigned), unsigned, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(pow2, ref))


def test_rotated_product_equals_the_unrotated_one_before_rounding():
    """Q(v M) . Q(R M)^T approximates v . R^T because M is orthogonal: without the 4-bit rounding
    the rotated operands give the same product (to float32 rounding)."""
    gen = torch.Generator().manual_seed(7)
    v, r = torch.randn(16, 192, generator=gen), torch.randn(24, 192, generator=gen)
    rotation = numerics.butterfly_rotation(torch.rand(numerics.ROTATION_STAGES, 32, generator=gen) * 6.3)
    every = torch.ones(3, dtype=torch.bool)
    r_rot = (r.double().reshape(24, 3, 64) @ numerics.rotation_matrix(rotation)).reshape(24, 192)
    got = numerics.rotate_groups(v, rotation, every).double() @ r_rot.t()
    assert torch.allclose(got, v.double() @ r.double().t(), atol=1e-4)
    back = numerics.unrotated_residual(r_rot.float(), rotation, every)
    assert torch.allclose(back, r, atol=1e-5)


def test_a_rotation_of_two_passes_is_the_two_passes_in_turn():
    gen = torch.Generator().manual_seed(8)
    v = torch.randn(5, 128, generator=gen)
    first, second = (numerics.butterfly_rotation(torch.rand(numerics.ROTATION_STAGES, 32, generator=gen) * 6.3)
                     for _ in range(2))
    both = torch.cat([first, second])
    every = torch.ones(2, dtype=torch.bool)
    assert torch.equal(numerics.rotate_groups(v, both, every),
                       numerics.rotate_groups(numerics.rotate_groups(v, first, every), second, every))
    assert torch.allclose(numerics.rotation_matrix(both),
                          numerics.rotation_matrix(first) @ numerics.rotation_matrix(second), atol=1e-12)
