"""Kernel 1, the activation quantizer (docs/DESIGN.md#kernels): its definition in `numerics`
(quantize_activations, and the power-of-two scales of quantize_activations_pow2), and every W4A4
family's kernel 1 against it.

The kernels' codes and scales must equal numerics bit for bit: they perform the same IEEE divisions
(reciprocal + Markstein correction, exact for normal quotients) and round half to even like
torch.round, so there is no tie case where the two may differ. Layers with a group rotation
(numerics.rotate_groups: the Hadamard one and random butterflies of one and two passes) are among the cases, their
shifted groups unrotated; the low-rank branch reads the unrotated x either way. The low-rank down projection fused
into kernel 1 is compared with float64 (1e-3). The sm90 family's tests run on an sm_90 GPU, the
sm80 family's on any sm_80+ GPU (the H100 emulates INT4 mma.sync, slowly but exactly); the kernels
come through svdquant.cuda (prebuilt cubins where present, else NVRTC).
"""

from __future__ import annotations

import pytest
import torch

from random_layers import (KERNEL1_ROTATION, activations, gen, group_rotation, needs_sm80, needs_sm90, rel,
                           sm80_kernel1, sm90_kernel1, w4a4_layer)
from svdquant import kernels, numerics
from svdquant.families import sm80, sm90

G = numerics.GROUP_SIZE


# ---- numerics: the definition --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pow2_activation_quantizer_rules(dtype):
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 640, generator=generator) * torch.logspace(-4, 1, 640)
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


def test_pow2_activations_of_layer_input():
    x = (torch.randn(5, 256) * 3).bfloat16()
    smooth = (torch.rand(256) + 0.5).bfloat16()
    shift = torch.zeros(256)
    shift[128:] = numerics.GELU_SHIFT
    codes, atok, exps = numerics.quantize_activations_pow2(x, smooth, shift.bfloat16())
    v = (x.float() + shift.bfloat16().float()) * torch.reciprocal(smooth.float())
    ref = numerics.quantize_groups_pow2(v, torch.tensor([False, False, True, True]), scale_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip((codes, atok, exps), ref))


# ---- sm90: act_quant.cu ----------------------------------------------------------------------------

@needs_sm90
@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("k,rank,rotation", [(128, 32, "none"), (320, 160, "none"), (1600, 32, "none"),
                                             (1600, 320, "none"), (320, 48, "none"), (128, 0, "none"),
                                             (128, 0, "hadamard"), (1600, 32, "hadamard"), (320, 48, "random"),
                                             (320, 48, "random2")])
@pytest.mark.parametrize("mode", ["exact", "pow2", "pow2_int8"])
def test_sm90_act_quant_matches_reference(m, dtype, unsigned, k, rank, rotation, mode):
    # K = 128, 320: one or two groups per CTA of a small cluster; K = 1600 (25 groups): clusters
    # whose last CTA has fewer groups; ranks run in blocks of 64, each a sweep over the resident x
    # slice (32, 48: one partial block whose wgmma rows past the ranks are discarded; 160: the last
    # block half full, its missing rows zero-filled by TMA; 320: five blocks). pow2_int8: the same
    # codes as the fast kernel 2's s8 operands. rotation: in pass 1 and (pow2) in pass 2
    pow2, int8_operands = mode != "exact", mode == "pow2_int8"
    seed = m * 7 + rank + unsigned + k + 11 * pow2
    generator = gen(seed)
    layer = w4a4_layer(64, k, rank, dtype, generator, unsigned, rotation=group_rotation(rotation, seed))
    assert layer.w4a4_kernel().kernel1_rotation()[0] == KERNEL1_ROTATION[rotation]  # the path under test
    x = activations(m, k, dtype, generator, layer.unsigned_groups)
    codes, ascales, lora_act = sm90_kernel1(x, layer, pow2, int8_operands)
    torch.cuda.synchronize()

    got = sm90.act_operands_to_natural(codes, int8_operands)
    if pow2:
        ref_codes, ref_atok, ref_exps = numerics.quantize_activations_pow2(x, layer.smooth, layer.shift,
                                                                           rotation=layer.rotation)
        ref = ref_codes.float() * torch.exp2(-ref_exps.float()).repeat_interleave(G, dim=1)
        assert torch.equal(ascales[0, :m], ref_atok.float())
    else:
        ref_codes, ref_scales = numerics.quantize_activations(x, layer.smooth, layer.shift, rotation=layer.rotation)
        ref = ref_codes.float()
        assert torch.equal(ascales[:, :m].t(), ref_scales.float())
    mismatch = (got != ref).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} codes differ, first at {mismatch[:5].tolist()}"
    assert bool((ascales[:, m:] == 0).all()), "padding rows of the scales must be zero"

    ref_lora = (x.double() @ layer.lora_down.double()).to(dtype)
    assert rel(lora_act, ref_lora) <= 1e-3


# ---- sm80: act_quant.cu ----------------------------------------------------------------------------

@needs_sm80
@pytest.mark.parametrize("m", [1, 7, 255, 256, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("k,rank,rotation", [(128, 32, "none"), (320, 16, "none"), (1600, 24, "none"), (576, 0, "none"),
                                             (1600, 24, "random"), (1600, 24, "random2"), (576, 0, "hadamard"),
                                             (64, 16, "none")])
@pytest.mark.parametrize("pow2", [False, True])
def test_sm80_act_quant_matches_reference(m, dtype, unsigned, k, rank, rotation, pow2):
    # rank 24: lora_down padded to 32 ranks with zero rows (two warps, the second half empty). The CTA's two
    # halves take the groups of a step in pairs: K = 128 two groups, K = 64 one (the second half idle), 320,
    # 576 and 1600 an odd count (a half-empty last step and, in pow2 mode, an empty position before pass 2)
    seed = m * 7 + rank + unsigned + k + 11 * pow2
    generator = gen(seed)
    layer = w4a4_layer(64, k, rank, dtype, generator, unsigned, rotation=group_rotation(rotation, seed))
    assert layer.w4a4_kernel().kernel1_rotation()[0] == KERNEL1_ROTATION[rotation]  # the path under test
    x = activations(m, k, dtype, generator, layer.unsigned_groups)
    codes, ascales, lora_act = sm80_kernel1(x, layer, pow2)
    torch.cuda.synchronize()
    if pow2:
        ref_codes, ref_atok, ref_exps = numerics.quantize_activations_pow2(x, layer.smooth, layer.shift,
                                                                           rotation=layer.rotation)
        ref_scales = numerics.pow2_scales(ref_atok, ref_exps)
    else:
        ref_codes, ref_scales = numerics.quantize_activations(x, layer.smooth, layer.shift, rotation=layer.rotation)
    ref_packed = numerics.pack_int4(ref_codes)
    mismatch = (codes != ref_packed).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} code bytes differ, first at {mismatch[:5].tolist()}"
    assert torch.equal(ascales[:, :m].t(), ref_scales.float())
    if rank:
        ref_lora = x.double() @ layer.lora_down.double()
        assert lora_act.shape == (m, 32 if rank == 24 else rank)
        assert rel(lora_act[:, :rank], ref_lora.to(dtype)) <= 1e-3
        assert bool((lora_act[:, rank:] == 0).all())
    else:
        assert lora_act is None


@needs_sm80
@pytest.mark.parametrize("m", [1, 7, 255, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("k,rank,rotation", [(128, 32, "none"), (1600, 24, "none"), (576, 0, "none"),
                                             (1600, 24, "random"), (1600, 24, "random2"), (64, 32, "none")])
def test_sm80_act_quant_s8_operands(m, dtype, unsigned, k, rank, rotation):
    # the whole-K kernel 2's operands: code * 2^(3 - e) as s8 bytes in slot order, atok per token
    seed = m * 5 + rank + unsigned + k
    generator = gen(seed)
    layer = w4a4_layer(64, k, rank, dtype, generator, unsigned, rotation=group_rotation(rotation, seed))
    x = activations(m, k, dtype, generator, layer.unsigned_groups)
    kernel = layer.w4a4_kernel()
    smooth, inv_smooth, group_shift, lora_t = sm80.kernel1_inputs(kernel)
    codes, atok, lora_act = sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=True, int8_operands=True,
                                           rotation=kernel.kernel1_rotation())
    _, _, pow2_lora_act = sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, pow2=True,
                                         rotation=kernel.kernel1_rotation())
    torch.cuda.synchronize()
    ref_codes, ref_atok, ref_exps = numerics.quantize_activations_pow2(x, layer.smooth, layer.shift,
                                                                       rotation=layer.rotation)
    shift = (numerics.POW2_ACT_MAX_EXP - ref_exps.long()).repeat_interleave(numerics.GROUP_SIZE, dim=-1)
    ref_s8 = (ref_codes.long() * torch.exp2(shift.double()).long()).to(torch.int8)
    natural = sm80.int8_operands_to_natural(codes)
    mismatch = (natural != ref_s8).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} operand bytes differ, first at {mismatch[:5].tolist()}"
    assert atok.shape == (1, sm80.scales_rows(m)) and torch.equal(atok[0, :m], ref_atok.float())
    if rank:
        assert torch.equal(lora_act, pow2_lora_act)
    else:
        assert lora_act is None


@needs_sm80
def test_sm80_kernel1_inputs_follow_the_tensors():
    layer = w4a4_layer(64, 128, 16, torch.bfloat16, gen(3), unsigned=False)
    kernel = layer.w4a4_kernel()
    first = sm80.kernel1_inputs(kernel)
    assert sm80.kernel1_inputs(kernel) is first
    layer.lora_down.mul_(2)  # an in-place edit (a LoRA strength) bumps the version
    assert torch.equal(sm80.kernel1_inputs(layer.w4a4_kernel())[3][:16], layer.lora_down.t())


@needs_sm80
@pytest.mark.parametrize("family", ["sm80", "sm90"])
def test_act_quant_refuses_a_rotation_it_cannot_read(family):
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    layer = w4a4_layer(64, 128, 16, torch.bfloat16, gen(5), unsigned=False)
    x = activations(4, 128, torch.bfloat16, gen(6), layer.unsigned_groups)
    kernel = layer.w4a4_kernel()
    if family == "sm80":
        inputs, error = sm80.kernel1_inputs(kernel), sm80.Sm80InputError

        def run(rotation):
            return sm80.act_quant(x, *inputs, rotation=rotation)
    else:
        inputs, error = sm90.kernel1_inputs(kernel), RuntimeError

        def run(rotation):
            return sm90.act_quant(x, *inputs, rotation=rotation)
    kind, good = kernels.kernel1_rotation(group_rotation("random", 5), x.device)
    run((kind, good))
    run(kernels.kernel1_rotation(group_rotation("random2", 5), x.device))
    run(kernels.kernel1_rotation(numerics.hadamard_rotation(), x.device))
    with pytest.raises(error, match="rotation coefficients must be torch.float32"):
        run((kind, good.double()))
    with pytest.raises(error, match=r"rotation coefficients must have shape \[192, 4\]"):
        run((kind, good[:96]))
    with pytest.raises(error, match=r"rotation coefficients must have shape \[192, 4\]"):
        run((kind, torch.cat((good, good[:96]))))  # not a whole number of passes
    with pytest.raises(error, match="rotation coefficients must be contiguous"):
        run((kind, good.t().contiguous().t()))
    with pytest.raises(error, match="rotation coefficients must be on"):
        run((kind, good.cpu()))
    misaligned = torch.empty(good.numel() + 1, device=x.device)[1:].view(good.shape)
    misaligned.copy_(good)
    with pytest.raises(error, match="16-byte boundary"):
        run((kind, misaligned))
    with pytest.raises(error, match="kernels.kernel1_rotation's, got kind 3"):
        run((3, None))
    with pytest.raises(error, match="kernels.kernel1_rotation's, got kind 1"):
        run((kernels.ROTATION_HADAMARD, good))  # the Hadamard path reads no coefficients


def test_kernel1_rotation_takes_the_hadamard_path_only_for_the_exact_hadamard_rotation():
    hadamard = numerics.hadamard_rotation()
    cpu = torch.device("cpu")
    assert kernels.kernel1_rotation(None, cpu) == (kernels.ROTATION_NONE, None)
    assert kernels.kernel1_rotation(hadamard, cpu) == (kernels.ROTATION_HADAMARD, None)
    assert kernels.kernel1_rotation(hadamard.double(), cpu) == (kernels.ROTATION_HADAMARD, None)
    # the butterfly of angles pi/4 is the Walsh-Hadamard transform up to signs and rounding: not it
    near = numerics.butterfly_rotation(torch.full((numerics.ROTATION_STAGES, G // 2), torch.pi / 4))
    one_off = hadamard.clone()
    one_off[2, 17, 1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    # rotations of two passes (12 stages) take the coefficient path, the Hadamard rotation twice too
    twice = torch.cat((hadamard, hadamard))
    for rotation in (near, one_off, group_rotation("random", 3), group_rotation("random2", 3), twice):
        kind, coef = kernels.kernel1_rotation(rotation, cpu)
        passes = rotation.shape[0] // numerics.ROTATION_STAGES
        assert kind == kernels.ROTATION_COEFFICIENTS and coef.shape == (passes * kernels.ROTATION_COEFFICIENT_ROWS, 4)
        # rotate_octet_coefficients' layout: pass p's float4 (4 s + j) * 8 + t = columns 8 t + 2 j, 8 t + 2 j + 1
        # of stage 6 p + s
        for p in range(passes):
            for s_, j, t in ((0, 0, 0), (2, 3, 5), (5, 1, 7), (3, 2, 2)):
                assert torch.equal(coef[kernels.ROTATION_COEFFICIENT_ROWS * p + (4 * s_ + j) * 8 + t],
                                   rotation[6 * p + s_, 8 * t + 2 * j:8 * t + 2 * j + 2].flatten())
        assert torch.equal(coef.reshape(-1).sort().values, rotation.reshape(-1).sort().values)
    # a rotation is whole passes of six stages on 64 columns
    for bad in (hadamard[:5], torch.cat((hadamard, hadamard[:1])), hadamard[:0], hadamard[:, :32], hadamard[..., :1]):
        with pytest.raises(ValueError, match=r"a group rotation is \[6 P, 64, 2\] with P >= 1 passes"):
            kernels.kernel1_rotation(bad, cpu)


@needs_sm80
@pytest.mark.parametrize("family", ["sm80", "sm90"])
@pytest.mark.parametrize("pow2", [False, True])
def test_both_rotation_paths_agree_on_the_hadamard_rotation(family, pow2):
    # kernel 1's Hadamard path (sums and differences; stage 5 as two products by 1/8 and a sum) and
    # its coefficient path on the same rotation, against numerics on the CPU, with groups scaled
    # down so far that their values are subnormal in float32 (where 0.125 (a + b) would differ from
    # 0.125 a + 0.125 b); exact mode's per-group scales see them, pow2 mode's token scale does not
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    m, k, dtype = 70, 1600, torch.bfloat16
    layer = w4a4_layer(64, k, 32, dtype, gen(9), unsigned=True, rotation=numerics.hadamard_rotation())
    x = activations(m, k, dtype, gen(10), layer.unsigned_groups).float()
    x[:, 2 * G:3 * G] *= 2.0**-126
    x[::3, 12 * G:13 * G] *= 2.0**-130
    x = x.to(dtype)
    kernel = layer.w4a4_kernel()
    if family == "sm80":
        family_module, (smooth, inv_smooth, shift, lora) = sm80, sm80.kernel1_inputs(kernel)
    else:
        family_module, (smooth, inv_smooth, shift, _) = sm90, sm90.kernel1_inputs(kernel)
        lora = sm90.kernel1_lora_down(layer.lora_down)
    assert kernel.kernel1_rotation() == (kernels.ROTATION_HADAMARD, None)
    coefficients = (kernels.ROTATION_COEFFICIENTS, kernels.rotation_coefficients(layer.rotation, x.device))
    fast, general = (family_module.act_quant(x, smooth, inv_smooth, shift, lora, pow2, rotation=rotation)
                     for rotation in (kernel.kernel1_rotation(), coefficients))
    torch.cuda.synchronize()
    # (sm80 leaves the scales of the padding tokens m..m_al-1 unwritten)
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1][:, :m], general[1][:, :m])
    v = (x.float() + layer.shift.float()) / layer.smooth.float()
    assert int(((v != 0) & (v.abs() < 2.0**-126)).sum()) > 1000  # subnormal inputs to the rotation
    cpu = [t.cpu() for t in (x, layer.smooth, layer.shift, layer.rotation)]
    codes, ascales = fast[0].cpu(), fast[1].cpu()
    if pow2:
        ref_codes, ref_atok, ref_exps = numerics.quantize_activations_pow2(*cpu[:3], rotation=cpu[3])
        ref_scales = numerics.pow2_scales(ref_atok, ref_exps)
    else:
        ref_codes, ref_scales = numerics.quantize_activations(*cpu[:3], rotation=cpu[3])
    if family == "sm80":
        assert torch.equal(codes, numerics.pack_int4(ref_codes)) and torch.equal(ascales[:, :m].t(), ref_scales.float())
    else:
        got = sm90.act_operands_to_natural(codes)
        if pow2:
            ref = ref_codes.float() * torch.exp2(-ref_exps.float()).repeat_interleave(G, dim=1)
            assert torch.equal(got, ref) and torch.equal(ascales[0, :m], ref_atok.float())
        else:
            assert torch.equal(got, ref_codes.float()) and torch.equal(ascales[:, :m].t(), ref_scales.float())


# ---- a concatenated input, read where its parts lie (kernels.Concat) -------------------------------------------

@needs_sm80
@pytest.mark.parametrize("family", ["sm90", "sm80"])
@pytest.mark.parametrize("m", [1, 7, 255, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k1,k2,rank,rotation", [(64, 64, 32, "none"), (3072, 12288, 32, "none"),
                                                 (1600, 320, 16, "hadamard"), (128, 1472, 0, "none"),
                                                 (960, 64, 32, "random")])
@pytest.mark.parametrize("mode", ["exact", "pow2", "pow2_int8"])
def test_kernel1_of_a_concatenation_is_kernel1_of_the_concatenated_input(family, m, dtype, k1, k2, rank, rotation,
                                                                         mode):
    # kernel 1 on x [M, K1] and x2 [M, K2], both strided views (x's columns of a contiguous tensor, x2 a slice of a
    # wider one, as FLUX's single blocks give linear2 the attention output and linear1's GELU columns), against
    # kernel 1 on their concatenation: codes, scales and low-rank outputs equal bit for bit. The split lands inside
    # a CTA's groups and at its edges (sm90 clusters of 1 to 16 CTAs), unsigned groups on both sides, rotations
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    k = k1 + k2
    generator = gen(m + k1 + 3 * k2 + rank)
    layer = w4a4_layer(64, k, rank, dtype, generator, True, rotation=group_rotation(rotation, k))
    x = activations(m, k, dtype, generator, layer.unsigned_groups)
    wide = torch.randn(m, 3 * k1 + k2, generator=generator, device=x.device).to(dtype)
    wide[:, 3 * k1:] = x[:, k1:]
    first, second = x[:, :k1], wide[:, 3 * k1:]
    kernel = layer.w4a4_kernel()
    pow2, int8_operands = mode != "exact", mode == "pow2_int8"
    if family == "sm90":
        smooth, inv_smooth, shift, _ = sm90.kernel1_inputs(kernel)
        inputs = (smooth, inv_smooth, shift, sm90.kernel1_lora_down(layer.lora_down))
    else:
        inputs = sm80.kernel1_inputs(kernel)
    act_quant = sm90.act_quant if family == "sm90" else sm80.act_quant
    parts = act_quant(first, *inputs, pow2, int8_operands, kernel.kernel1_rotation(), x2=second)
    whole = act_quant(x, *inputs, pow2, int8_operands, kernel.kernel1_rotation())
    torch.cuda.synchronize()
    # ascales' rows m .. m_al - 1: written as 0 by sm90, not written by sm80
    for name, a, b in (("codes", parts[0], whole[0]), ("ascales", parts[1][:, :m], whole[1][:, :m]),
                       ("lora_act", parts[2], whole[2])):
        if b is None:  # sm80 at rank 0
            assert a is None, name
            continue
        differ = (a != b).nonzero()
        assert differ.numel() == 0, f"{name}: {differ.shape[0]} differ, first at {differ[:5].tolist()}"


@needs_sm80
@pytest.mark.parametrize("family", ["sm90", "sm80"])
def test_act_quant_checks_a_concatenation(family):
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    module, error = (sm90, RuntimeError) if family == "sm90" else (sm80, sm80.Sm80InputError)
    layer = w4a4_layer(64, 256, 16, torch.bfloat16, gen(3), False)
    kernel = layer.w4a4_kernel()
    inputs = ((*sm90.kernel1_inputs(kernel)[:3], sm90.kernel1_lora_down(layer.lora_down)) if family == "sm90"
              else sm80.kernel1_inputs(kernel))
    x = torch.zeros(5, 256, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(error, match="multiple of 64"):
        module.act_quant(x[:, :100], *inputs, x2=x[:, 100:])
    with pytest.raises(error, match="x2 must be 2-D"):
        module.act_quant(x[:, :128], *inputs, x2=x[:4, 128:])
    with pytest.raises(error, match="x2 needs unit column stride"):
        module.act_quant(x[:, :128], *inputs, x2=torch.zeros(5, 129, dtype=torch.bfloat16, device="cuda")[:, 1:])
    with pytest.raises(error, match="a norm"):
        module.act_quant(x[:, :128], *inputs, norm=kernels.ModulatedNorm(None, None, 1e-6), x2=x[:, 128:])
