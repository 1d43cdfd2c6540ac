"""Kernel 1's norm prologue (docs/DESIGN.md#producer-quantization): its definition,
numerics.modulated_layer_norm (FLUX's LayerNorm + modulation), against PyTorch's own ops, and each family's
kernel 1 with the prologue on a LayerNorm's input against the same kernel 1 on the normalized input, bit for bit
(codes, scales and the low-rank outputs): the prologue must rewrite kernel 1's input to exactly that tensor.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from random_layers import activations, gen, group_rotation, needs_sm80, needs_sm90, sm90_kernel1, w4a4_layer
from svdquant import kernels, numerics
from svdquant.families import norm_arguments, sm80, sm90

G = numerics.GROUP_SIZE


def layer_norm_inputs(batches: int, tokens: int, k: int, dtype: torch.dtype, generator: torch.Generator):
    """A LayerNorm's input h [B, L, K] (outliers, a non-zero mean per token, one constant token) and FLUX-like
    modulation mult = 1 + scale, add [B, 1, K]."""
    dev = generator.device
    h = activations(batches * tokens, k, torch.float32, generator, torch.zeros(k // G, dtype=torch.bool))
    h = h + torch.randn(batches * tokens, 1, generator=generator, device=dev) * 4
    h[0] = 2.5  # zero variance: rstd = 1 / sqrt(eps)
    mult = 1 + 0.3 * torch.randn(batches, 1, k, generator=generator, device=dev)
    add = 0.5 * torch.randn(batches, 1, k, generator=generator, device=dev)
    return h.reshape(batches, tokens, k).to(dtype), mult.to(dtype), add.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modulated_layer_norm_is_pytorchs_up_to_rounding(dtype):
    h, mult, add = layer_norm_inputs(2, 33, 3072, dtype, gen(3, "cpu"))
    got = numerics.modulated_layer_norm(h, mult, add, 1e-6)
    ln = torch.nn.functional.layer_norm(h.double(), (3072,), eps=1e-6)
    want = ln.to(dtype).double() * mult.double() + add.double()
    # within an ulp of the output plus an ulp of ln scaled by mult (the LayerNorm's own rounding), and equal
    # almost everywhere
    step = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    bound = step * (want.abs() + (ln.abs() * mult.double()).abs()) + 2.0 ** -24
    assert bool(((got.double() - want).abs() <= bound).all())
    assert float((got != want.to(dtype)).double().mean()) < 0.01
    # the LayerNorm alone, and the batches' modulations kept apart
    alone = numerics.modulated_layer_norm(h, None, None, 1e-6)
    assert float((alone.double() - ln).abs().max()) <= 2.0 ** -5 * float(ln.abs().max())
    one = numerics.modulated_layer_norm(h[1:], mult[1:], add[1:], 1e-6)
    assert torch.equal(one, got[1:])
    assert bool((got[0, 0] == add[0, 0]).all())  # the constant token normalizes to 0
    with pytest.raises(ValueError, match="B, L, K"):
        numerics.modulated_layer_norm(h[0], None, None, 1e-6)


def test_norm_arguments_check_the_modulation():
    # the host-side checks both families' kernel 1 share (families.norm_arguments), and the arguments they pass
    x = torch.zeros(6, 128, dtype=torch.bfloat16)
    rows = torch.ones(4, 128, dtype=torch.bfloat16)
    for norm, norm_out, problem in [
            (kernels.ModulatedNorm(rows, rows, 1e-6), None, "equal batches"),
            (kernels.ModulatedNorm(rows[:2].float(), rows[:2], 1e-6), None, "norm.mult"),
            (kernels.ModulatedNorm(None, None, -1.0), None, "eps"),
            (None, torch.zeros(6, 128, dtype=torch.bfloat16), "norm_out needs norm"),
            (kernels.ModulatedNorm(None, None, 1e-6), torch.zeros(6, 64, dtype=torch.bfloat16), "norm_out")]:
        with pytest.raises(RuntimeError, match=problem):
            norm_arguments(norm, norm_out, x)
    flag, mult, add, tokens_per_batch, eps, stored = norm_arguments(
        kernels.ModulatedNorm(rows[:2].reshape(2, 1, 128), rows[:2].reshape(2, 1, 128) * 2, 1e-6), None, x)
    assert flag and mult.shape == add.shape == (2, 128) and mult.is_contiguous() and bool((add == 2).all())
    assert tokens_per_batch == 3 and eps.value == 1e-6 and stored is None
    assert norm_arguments(None, None, x)[0] is False


@needs_sm90
@pytest.mark.parametrize("batches,tokens", [(1, 1), (1, 7), (1, 255), (2, 128), (1, 4097), (2, 2304)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,rank,rotation", [(128, 32, "none"), (1600, 32, "none"), (3072, 32, "none"),
                                             (3072, 0, "none"), (320, 64, "none"), (3072, 32, "hadamard")])
@pytest.mark.parametrize("mode", ["exact", "pow2", "pow2_int8"])
@pytest.mark.parametrize("modulated", [True, False])
def test_sm90_norm_prologue_is_kernel1_of_the_normalized_input(batches, tokens, dtype, k, rank, rotation, mode,
                                                               modulated):
    # kernel 1 with the prologue on h against kernel 1 on numerics.modulated_layer_norm(h): the same codes, scales
    # and low-rank outputs bit for bit (the prologue rewrites the resident slice to exactly that input). Clusters
    # of one CTA (K = 128) to 16 (small M), partial last CTAs (K = 1600), rank blocks of 64 (320, 64)
    pow2, int8_operands = mode != "exact", mode == "pow2_int8"
    generator = gen(batches * tokens + k + rank + 5 * pow2)
    layer = w4a4_layer(64, k, rank, dtype, generator, False, rotation=group_rotation(rotation, k))
    h, mult, add = layer_norm_inputs(batches, tokens, k, dtype, generator)
    norm = kernels.ModulatedNorm(mult, add, 1e-6) if modulated else kernels.ModulatedNorm(None, None, 1e-5)
    m = batches * tokens
    normalized = torch.full((m, k), float("nan"), dtype=dtype, device="cuda")
    fused = sm90_kernel1(h.reshape(m, k), layer, pow2, int8_operands, norm, normalized)
    x = norm.apply(h.reshape(m, k))
    plain = sm90_kernel1(x, layer, pow2, int8_operands)
    torch.cuda.synchronize()
    for name, a, b in zip(("codes", "ascales", "lora_act", "stored input"), (*fused, normalized), (*plain, x)):
        differ = (a != b).nonzero()
        assert differ.numel() == 0, f"{name}: {differ.shape[0]} differ, first at {differ[:5].tolist()}"


def test_sm90_act_quant_checks_the_modulation():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.zeros(6, 128, dtype=torch.bfloat16, device="cuda")
    inputs = (torch.ones(128, device="cuda"), torch.ones(128, device="cuda"), None,
              torch.zeros(0, 128, dtype=torch.bfloat16, device="cuda"))
    wrong = torch.ones(4, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="equal batches"):
        sm90.act_quant(x, *inputs, norm=kernels.ModulatedNorm(wrong, wrong, 1e-6))
    with pytest.raises(RuntimeError, match="norm.mult"):
        sm90.act_quant(x, *inputs, norm=kernels.ModulatedNorm(wrong[:2].float(), wrong[:2], 1e-6))


# ---- sm80: the prologue in act_quant.cu's cp.async ring -----------------------------------------------------------


def sm80_kernel1_of(x: torch.Tensor, layer, mode: str, norm: kernels.ModulatedNorm | None = None,
                    norm_out: torch.Tensor | None = None):
    """sm80 kernel 1 with the layer's inputs in `mode`: exact, pow2, or pow2_int8 (the whole-K kernel 2's s8
    operands); norm: its norm prologue (x the LayerNorm's input), storing the layer's input into norm_out where
    given."""
    kernel = layer.w4a4_kernel()
    smooth, inv_smooth, group_shift, lora_t = sm80.kernel1_inputs(kernel)
    return sm80.act_quant(x, smooth, inv_smooth, group_shift, lora_t, mode != "exact", mode == "pow2_int8",
                          kernel.kernel1_rotation(), norm, norm_out)


@needs_sm80
@pytest.mark.parametrize("batches,tokens", [(1, 1), (1, 7), (1, 255), (1, 4097), (2, 2304), (3, 100), (6, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,rank,rotation,unsigned", [(128, 32, "none", False), (1600, 32, "none", False),
                                                      (3072, 32, "none", False), (3072, 0, "none", False),
                                                      (3072, 32, "hadamard", False), (64, 16, "none", True),
                                                      (1600, 16, "random", True)])
@pytest.mark.parametrize("mode", ["exact", "pow2", "pow2_int8"])
@pytest.mark.parametrize("modulated", [True, False])
def test_sm80_norm_prologue_is_kernel1_of_the_normalized_input(batches, tokens, dtype, k, rank, rotation, unsigned,
                                                               mode, modulated):
    # kernel 1 with the prologue on h against kernel 1 on numerics.modulated_layer_norm(h): the same codes, scales
    # and low-rank outputs bit for bit (the prologue rewrites every staged x tile to exactly that input, in pass 1
    # and in pow2 mode's pass 2), and that input stored into norm_out, every element (NaN where one is missed).
    # CTAs of 16 tokens inside one batch (2 x 2304), across two (3 x 100: the stage's second mult/add rows) and
    # across six (6 x 3: the tokens of the middle batches read theirs from device memory); K = 64 leaves the CTA's
    # second half without a group, 1600 gives it a half-empty last step; the Hadamard rotation and (random) the
    # coefficient entry points; unsigned groups
    generator = gen(batches * tokens + k + rank + 5 * (mode != "exact"))
    layer = w4a4_layer(64, k, rank, dtype, generator, unsigned, rotation=group_rotation(rotation, k))
    h, mult, add = layer_norm_inputs(batches, tokens, k, dtype, generator)
    norm = kernels.ModulatedNorm(mult, add, 1e-6) if modulated else kernels.ModulatedNorm(None, None, 1e-5)
    m = batches * tokens
    normalized = torch.full((m, k), float("nan"), dtype=dtype, device="cuda")
    fused = sm80_kernel1_of(h.reshape(m, k), layer, mode, norm, normalized)
    x = norm.apply(h.reshape(m, k))
    plain = sm80_kernel1_of(x, layer, mode)
    torch.cuda.synchronize()
    # ascales' rows m .. m_al - 1 are not written
    for name, a, b in (("codes", fused[0], plain[0]), ("ascales", fused[1][:, :m], plain[1][:, :m]),
                       ("lora_act", fused[2], plain[2]), ("stored input", normalized, x)):
        if b is None:  # rank 0
            assert a is None, name
            continue
        differ = (a != b).nonzero()
        assert differ.numel() == 0, f"{name}: {differ.shape[0]} differ, first at {differ[:5].tolist()}"


def test_sm80_act_quant_checks_the_modulation():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.zeros(6, 128, dtype=torch.bfloat16, device="cuda")
    inputs = (torch.ones(128, device="cuda"), torch.ones(128, device="cuda"), None, None)
    wrong = torch.ones(4, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(sm80.Sm80InputError, match="equal batches"):
        sm80.act_quant(x, *inputs, norm=kernels.ModulatedNorm(wrong, wrong, 1e-6))
    with pytest.raises(sm80.Sm80InputError, match="norm.mult"):
        sm80.act_quant(x, *inputs, norm=kernels.ModulatedNorm(wrong[:2].float(), wrong[:2], 1e-6))
    with pytest.raises(sm80.Sm80InputError, match="eps"):
        sm80.act_quant(x, *inputs, norm=kernels.ModulatedNorm(None, None, -1.0))
    # norm_out: only with a norm, [M, K] in x's dtype, contiguous, 16-byte aligned
    alone = kernels.ModulatedNorm(None, None, 1e-6)
    with pytest.raises(sm80.Sm80InputError, match="norm_out needs norm"):
        sm80.act_quant(x, *inputs, norm_out=torch.empty_like(x))
    for wrong_out in (torch.empty(6, 64, dtype=torch.bfloat16, device="cuda"), torch.empty_like(x, dtype=torch.float16),
                      torch.empty(128, 6, dtype=torch.bfloat16, device="cuda").t(),
                      torch.empty(6 * 128 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(6, 128)):
        with pytest.raises(sm80.Sm80InputError, match="norm_out"):
            sm80.act_quant(x, *inputs, norm=alone, norm_out=wrong_out)


# ---- every family: the layer ------------------------------------------------------------------------------------

@needs_sm80
@pytest.mark.parametrize("family", ["sm90", "sm80-int8", "sm80-int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fast", [False, True])
def test_layer_with_a_norm_input(family, dtype, fast, monkeypatch):
    # W4A4Kernel(h, norm) on each family runs the prologue (KERNEL1_NORM) and gives the layer's output on the
    # normalized input bit for bit: exact and fast (pow2 weights and activations: the fast kernel 2s after kernel 1's
    # s8 operands), the sm80 family's two kernel 2 variants; above KERNEL1_MAX_RANK kernel 1 also stores that input
    # (norm_out) for cuBLAS's low-rank GEMM
    module = sm90 if family == "sm90" else sm80
    if family == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs an sm_90 GPU")
    stored = []
    act_quant = module.act_quant

    def recording_act_quant(*args, **kwargs):
        stored.append(inspect.signature(act_quant).bind(*args, **kwargs).arguments.get("norm_out"))
        return act_quant(*args, **kwargs)

    monkeypatch.setattr(module, "act_quant", recording_act_quant)
    generator = gen(29 + fast)
    h, mult, add = layer_norm_inputs(2, 300, 3072, dtype, generator)
    norm = kernels.ModulatedNorm(mult, add, 1e-6)
    with kernels.forced_family(family):
        for rank in (32, 96):
            layer = w4a4_layer(384, 3072, rank, dtype, generator, False, pow2_weights=fast)
            layer.pow2_activations = fast
            kernel = layer.w4a4_kernel()
            assert kernel.fallback_reason(h.reshape(600, 3072)) == ""
            stored.clear()
            got = kernel(h.reshape(600, 3072), norm)
            assert len(stored) == 1 and (stored[0] is not None) == (rank > kernels.KERNEL1_MAX_RANK), rank
            want = kernel(norm.apply(h.reshape(600, 3072)))
            assert torch.equal(got, want), rank
