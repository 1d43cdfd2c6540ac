"""Pending inputs of the 4-bit layers (svdquant.pending, docs/DESIGN.md#producer-quantization), a LayerNorm
(+ FLUX's modulation) and a concatenation: what a W4A4 layer computes from them, what any other use sees, and
when a LayerNorm or a concatenation stays pending."""

import pytest
import torch
import torch.nn.functional as F
from random_layers import gen, w4a4_layer, w4a16_layer

from svdquant import kernels, numerics, pending

EPS = 1e-6
B, L, K, N = 2, 9, 256, 192


def source(seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    """A block's hidden state [B, L, K]: per-token offsets and a few hot channels, as FLUX's residual stream."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, K, generator=g) + 3 * torch.randn(B, L, 1, generator=g)
    x[..., 5] *= 40
    return x.to(dtype)


def modulation(seed: int = 1, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 + scale, shift) [B, 1, K] as FLUX's Modulation gives them: shift a strided chunk of one output."""
    g = torch.Generator().manual_seed(seed)
    out = (0.5 * torch.randn(B, 1, 3 * K, generator=g)).to(dtype)
    shift, scale, _ = out.chunk(3, dim=-1)
    return 1 + scale, shift


def torchs(x, mult=None, add=None):
    """What ComfyUI's FLUX computes without the pack: PyTorch's LayerNorm, then addcmul where modulated."""
    ln = F.layer_norm(x, x.shape[-1:], eps=EPS)
    return ln if mult is None else torch.addcmul(add, ln, mult)


@pytest.fixture
def definitions(monkeypatch):
    """How many times numerics.modulated_layer_norm ran (the kernels' definition)."""
    calls = []
    definition = numerics.modulated_layer_norm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return definition(*args, **kwargs)

    monkeypatch.setattr(numerics, "modulated_layer_norm", counted)
    return calls


@pytest.fixture
def computations(monkeypatch):
    """How many times a pending LayerNorm was computed for a use other than a W4A4 layer's kernel."""
    calls = []
    compute = pending.PendingNorm._compute

    def counted(self):
        calls.append(self.shape)
        return compute(self)

    monkeypatch.setattr(pending.PendingNorm, "_compute", counted)
    return calls


@pytest.fixture
def kernel_norms(monkeypatch):
    """The `norm` argument of each W4A4Kernel call."""
    norms = []
    call = kernels.W4A4Kernel.__call__

    def recorded(self, x, norm=None, **kwargs):
        norms.append(norm)
        return call(self, x, norm=norm, **kwargs)

    monkeypatch.setattr(kernels.W4A4Kernel, "__call__", recorded)
    return norms


@pytest.mark.parametrize("rank", [0, 32, 64])
@pytest.mark.parametrize("scales", ["exact", "pow2"])
@pytest.mark.parametrize("shift", [False, True])
def test_w4a4_layer_on_a_pending_norm_computes_the_layer_on_the_definition(rank, scales, shift, definitions,
                                                                          computations, kernel_norms):
    layer = w4a4_layer(N, K, rank, torch.bfloat16, gen(rank, "cpu"), unsigned=shift, pow2_weights=scales == "pow2")
    layer.pow2_activations = scales == "pow2"
    x = source()
    mult, add = modulation()
    expected = layer(numerics.modulated_layer_norm(x, mult, add, EPS))
    definitions.clear()
    kernel_norms.clear()

    y = layer(torch.addcmul(add, pending.pending_layer_norm(x, EPS), mult))

    assert type(y) is torch.Tensor and torch.equal(y, expected)
    assert len(kernel_norms) == 1 and kernel_norms[0].mult.shape == (B, K)  # the layer took the norm itself
    assert len(definitions) == 1 and computations == []  # once, by the kernel's fallback on the CPU


def test_the_layer_norm_alone_and_modulations_of_every_batch_shape(kernel_norms):
    layer = w4a4_layer(N, K, 32, torch.bfloat16, gen(3, "cpu"), unsigned=False)
    x = source(4)
    mult, add = modulation(5)
    assert torch.equal(layer(pending.pending_layer_norm(x, EPS)), layer(numerics.modulated_layer_norm(x, None, None, EPS)))
    # one row for every batch, as [1, 1, K], [1, K] or [K]; the factors in either order
    for one_mult, one_add in ((mult[:1], add[:1]), (mult[0], add[0]), (mult[0, 0], add[0, 0])):
        rows = one_mult.reshape(1, K).expand(B, K), one_add.reshape(1, K).expand(B, K)
        expected = layer(numerics.modulated_layer_norm(x, *rows, EPS))
        assert torch.equal(layer(torch.addcmul(one_add, pending.pending_layer_norm(x, EPS), one_mult)), expected)
        assert torch.equal(layer(torch.addcmul(one_add, one_mult, pending.pending_layer_norm(x, EPS))), expected)
    assert sum(norm is not None for norm in kernel_norms) == 7  # the pending ones reached the kernel as such


def test_the_kernels_definition_matches_pytorchs_layer_norm_and_addcmul_within_bf16_rounding():
    x = source(6)
    mult, add = modulation(7)
    fused = numerics.modulated_layer_norm(x, mult, add, EPS)
    stock = torchs(x, mult, add)
    # each side rounds its LayerNorm and its result to bf16 once: one bf16 step (2^-8 relative) of each apart
    ln = F.layer_norm(x.float(), (K,), eps=EPS)
    bound = 2 ** -8 * ((ln * mult.float()).abs() + stock.float().abs())
    assert ((fused.float() - stock.float()).abs() <= bound).all()


def test_metadata_queries_do_not_compute(computations):
    p = torch.addcmul(modulation()[1], pending.pending_layer_norm(source(), EPS), modulation()[0])
    assert p.shape == (B, L, K) and p.size() == (B, L, K) and p.size(-1) == K and len(p) == B
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu" and not p.is_cuda and p.get_device() == -1
    assert p.dim() == p.ndim == 3 and p.numel() == B * L * K and p.element_size() == 2
    assert not p.requires_grad and p.is_floating_point() and p.is_contiguous() and p.stride() == (L * K, K, 1)
    assert p.layout == torch.strided and p.grad_fn is None
    assert computations == [] and p.kernel_input() is not None


def test_any_other_use_computes_it_once_as_pytorch_does_and_sees_the_same_tensor(computations, definitions):
    x = source(8)
    mult, add = modulation(9)
    expected = torchs(x, mult, add)
    p = torch.addcmul(add, pending.pending_layer_norm(x, EPS), mult)
    assert torch.equal(p + 1, expected + 1)
    assert torch.equal(F.gelu(p, approximate="tanh"), F.gelu(expected, approximate="tanh"))
    assert torch.equal(p.sum(-1), expected.sum(-1)) and torch.equal(p.float(), expected.float())
    assert torch.equal(p.reshape(-1, K), expected.reshape(-1, K))
    assert len(computations) == 1 and p.kernel_input() is None and definitions == []  # not the kernels' definition
    # a computed one is used as itself, by a layer too, and modulating it again is a plain addcmul
    assert torch.equal(torch.addcmul(add, p, mult), torch.addcmul(add, expected, mult))
    layer = w4a4_layer(N, K, 16, torch.bfloat16, gen(8, "cpu"), unsigned=False)
    assert torch.equal(layer(p), layer(expected)) and len(computations) == 1


def modulate_token_ranges(t, mult, add, ranges):
    """ComfyUI's apply_mod with modulation_dims: in-place edits of token slices, then the tensor itself."""
    for start, end, index in ranges:
        t[:, start:end] *= mult[:, index:index + 1]
        t[:, start:end] += add[:, index:index + 1]
    return t


def test_in_place_edits_of_slices_persist_for_later_users(computations, definitions):
    x = source(10)
    g = torch.Generator().manual_seed(11)
    mult, add = (1 + 0.3 * torch.randn(B, 2, K, generator=g)).bfloat16(), (0.3 * torch.randn(B, 2, K, generator=g)).bfloat16()
    ranges = [(0, 4, 0), (4, L, 1)]
    layer = w4a4_layer(N, K, 32, torch.bfloat16, gen(10, "cpu"), unsigned=True)
    expected = modulate_token_ranges(torchs(x), mult, add, ranges)
    p = pending.pending_layer_norm(x, EPS)
    edited = modulate_token_ranges(p, mult, add, ranges)
    assert edited is p and p.kernel_input() is None
    assert torch.equal(layer(edited), layer(expected)) and torch.equal(p.value(), expected)
    assert len(computations) == 1 and definitions == []


def test_modulations_that_are_not_per_batch_rows_compute_it_as_pytorch_does(kernel_norms):
    x = source(12)
    mult, add = modulation(13)
    ln = torchs(x)
    cases = [((add, mult), {"value": 2}),  # the product scaled
             ((add.expand(B, L, K).clone(), mult), {}),  # a shift per token
             ((add, mult.float()), {})]  # another dtype (PyTorch promotes)
    for (one_add, one_mult), kwargs in cases:
        result = torch.addcmul(one_add, pending.pending_layer_norm(x, EPS), one_mult, **kwargs)
        assert type(result) is torch.Tensor
        assert torch.equal(result, torch.addcmul(one_add, ln, one_mult, **kwargs))
    with pytest.raises(RuntimeError, match="size"):  # PyTorch's own broadcasting error, as without a pending norm
        torch.addcmul(add, pending.pending_layer_norm(x, EPS), mult.expand(B, 2, K))
    # modulated twice: the second is a plain addcmul on the first's value
    once = torch.addcmul(add, pending.pending_layer_norm(x, EPS), mult)
    twice = torch.addcmul(add, once, mult)
    assert type(twice) is torch.Tensor
    assert torch.equal(twice, torch.addcmul(add, torchs(x, mult, add), mult))
    assert kernel_norms == []


def test_modules_that_are_not_w4a4_layers_take_it_as_its_value():
    x = source(14)
    mult, add = modulation(15)

    def fresh():
        return torch.addcmul(add, pending.pending_layer_norm(x, EPS), mult)

    dense = torch.nn.Linear(K, N, dtype=torch.bfloat16)
    mlp = torch.nn.Sequential(w4a4_layer(4 * K, K, 32, torch.bfloat16, gen(14, "cpu"), unsigned=False),
                              torch.nn.GELU(approximate="tanh"),
                              w4a4_layer(K, 4 * K, 32, torch.bfloat16, gen(15, "cpu"), unsigned=True))
    w4a16 = w4a16_layer(N, K, torch.bfloat16, gen(16, "cpu"))
    with torch.no_grad():
        for module in (dense, w4a16):
            assert torch.equal(module(fresh()), module(torchs(x, mult, add)))
        # a module that starts with a W4A4 layer hands it to that layer's kernel
        assert torch.equal(mlp(fresh()), mlp(numerics.modulated_layer_norm(x, mult, add, EPS)))


def test_code_bypassing_torch_function_runs_on_the_value():
    x = source(18)
    p = pending.pending_layer_norm(x, EPS)
    with torch._C.DisableTorchFunctionSubclass():
        y = torch.mul(p, 3)
    assert type(y) is torch.Tensor and torch.equal(y, torchs(x) * 3)


def test_under_inference_mode():
    x = source(19)
    mult, add = modulation(20)
    layer = w4a4_layer(N, K, 32, torch.bfloat16, gen(19, "cpu"), unsigned=False)
    with torch.inference_mode():
        y = layer(torch.addcmul(add, pending.pending_layer_norm(x, EPS), mult))
        p = modulate_token_ranges(pending.pending_layer_norm(x, EPS), mult, add, [(0, L, 0)])
        edited = layer(p)
    assert torch.equal(y, layer(numerics.modulated_layer_norm(x, mult, add, EPS)))
    assert torch.equal(edited, layer(modulate_token_ranges(torchs(x), mult, add, [(0, L, 0)])))


class Consumer:
    """A W4A4 layer's answer to whether it computes a LayerNorm of x in its kernel (takes_norm_prologue)."""

    def __init__(self, takes: bool):
        self.takes, self.asked = takes, []

    def takes_norm_prologue(self, x):
        self.asked.append(x)
        return self.takes


def test_when_a_layer_norm_stays_pending(monkeypatch):
    x = source()
    monkeypatch.delenv(pending.FUSED_NORM_ENV, raising=False)
    taking, refusing = Consumer(True), Consumer(False)
    # on by default, where the layer it feeds computes it in its kernel
    assert pending.stays_pending(x, (K,), taking) and taking.asked == [x]
    assert not pending.stays_pending(x, (K,), refusing)  # FP8 execution, offloaded weights, no kernels
    assert not pending.stays_pending(x, (K,))  # a LayerNorm the loader gave no consumer
    monkeypatch.setenv(pending.FUSED_NORM_ENV, "0")
    assert not pending.stays_pending(x, (K,), taking)
    monkeypatch.setenv(pending.FUSED_NORM_ENV, "1")
    assert pending.stays_pending(x, (K,), taking) and not pending.stays_pending(x, (K,), refusing)
    # what the tensor itself must be, whatever the consumer says
    assert pending.stays_pending(x.half(), [K], taking)
    assert not pending.stays_pending(x.float(), (K,), taking)
    assert not pending.stays_pending(x[0], (K,), taking) and not pending.stays_pending(x, (L, K), taking)
    assert not pending.stays_pending(x.clone().requires_grad_(), (K,), taking)
    with torch.no_grad():
        assert pending.stays_pending(x.clone().requires_grad_(), (K,), taking)
    with pending.forced(True):  # the test hook ranks above the switch and the consumer
        monkeypatch.setenv(pending.FUSED_NORM_ENV, "0")
        assert pending.stays_pending(x, (K,)) and pending.stays_pending(x, (K,), refusing)
        assert not pending.stays_pending(x.float(), (K,))
        with pending.forced(False):
            assert not pending.stays_pending(x, (K,), taking)
    monkeypatch.delenv(pending.FUSED_NORM_ENV)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not pending.stays_pending(x, (K,), taking)


def test_a_w4a4_layer_takes_the_prologue_where_its_kernels_have_one_and_its_weights_are(monkeypatch):
    layer = w4a4_layer(N, K, 32, torch.bfloat16, gen(21, "cpu"), unsigned=False)
    x = source()
    assert not layer.takes_norm_prologue(x)  # the CPU: the reference path
    # the CPU standing in for a GPU whose kernels have the prologue, then for one whose kernels (FP8 execution's) do not
    with_prologue, without = type("Family", (), {"KERNEL1_NORM": True}), type("Family", (), {})
    family, asked = [with_prologue], []

    def route(kernel, x):
        asked.append(x)
        return family[0], {}, ""

    monkeypatch.setattr(kernels.W4A4Kernel, "_route", route)
    assert layer.takes_norm_prologue(x) and asked == [x]
    family[0] = without
    assert not layer.takes_norm_prologue(x)
    family[0] = with_prologue
    assert not layer.takes_norm_prologue(x.to("meta"))  # the input where the weights are not (offload memory)


def test_pending_layer_norm_takes_three_dimensions():
    with pytest.raises(ValueError, match="B, L, K"):
        pending.pending_layer_norm(source()[0], EPS)


# ---- the concatenation ----------------------------------------------------------------------------------------


def concat_inputs(seed: int = 2, width: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output [B, L, width], linear1's GELU columns [B, L, K - width]: a strided slice of its
    output)."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.randn(B, L, width, generator=g).to(torch.bfloat16)
    linear1 = torch.randn(B, L, 3 * width + K - width, generator=g).to(torch.bfloat16)
    return attention, linear1[..., 3 * width:]


def test_a_concatenation_with_the_operand_stays_pending_and_the_layer_computes_it():
    attention, mlp = concat_inputs()
    assert pending.concat_operand(mlp) is mlp  # a CPU tensor: no kernel 1 reads a concatenation here
    layer = w4a4_layer(N, K, 32, torch.bfloat16, gen(10, "cpu"), unsigned=False)
    expected = torch.cat((attention, mlp), dim=2)
    with pending.forced(True):
        for dim in (2, -1):
            operand = pending.concat_operand(mlp)
            assert type(operand) is pending.PendingConcat and operand.shape == mlp.shape
            p = torch.cat((attention, operand), dim)
            assert type(p) is pending.PendingConcat and p.pieces() == (attention, mlp)
            assert p.shape == (B, L, K) and p.dtype == torch.bfloat16 and p.is_contiguous()
            concats = []
            call = kernels.W4A4Kernel.__call__
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(kernels.W4A4Kernel, "__call__",
                              lambda self, x, **kwargs: concats.append(x) or call(self, x, **kwargs))
                y = layer(p)
            assert p.pieces() is not None  # the layer read the pieces, nothing computed the concatenation
            (concat,) = concats
            assert isinstance(concat, kernels.Concat) and concat.shape == (B * L, K)
            assert concat.parts[1].data_ptr() == mlp.data_ptr()  # the slice itself, read where it lies
            assert torch.equal(y, layer(expected))
            assert torch.equal(torch.cat((attention, operand), dim=dim).value(), expected)  # the kwarg form


def test_other_uses_of_a_pending_concatenation_compute_it_once():
    attention, mlp = concat_inputs(3)
    with pending.forced(True):
        operand = pending.concat_operand(mlp)
        assert torch.equal(operand * 2, mlp * 2)
        assert operand.pieces() is None and operand.value().is_contiguous() and torch.equal(operand.value(), mlp)
        # once computed it is a plain piece of the next concatenation
        assert type(torch.cat((attention, operand), 2)) is torch.Tensor
        p = torch.cat((attention, pending.concat_operand(mlp)), 2)
        value = p + 0
        assert torch.equal(value, torch.cat((attention, mlp), 2)) and p.value() is p.value()
        # a dense or W4A16 layer takes the value
        dense = torch.nn.Linear(K, N, dtype=torch.bfloat16)
        p = torch.cat((attention, pending.concat_operand(mlp)), 2)
        assert torch.equal(dense(p), dense(torch.cat((attention, mlp), 2)))


@pytest.mark.parametrize("case", ["other dim", "three pieces", "narrow first", "grad", "float32", "other rows"])
def test_concatenations_the_kernel_does_not_take_are_computed_as_pytorch_does(case):
    attention, mlp = concat_inputs(4)
    with pending.forced(True):
        operand = pending.concat_operand(mlp)
        if case == "other dim":
            args = ((attention, operand), 1)
            expected = torch.cat((attention, mlp), 1)
        elif case == "three pieces":
            args = ((attention, operand, attention), 2)
            expected = torch.cat((attention, mlp, attention), 2)
        elif case == "narrow first":
            args = ((attention[..., :100], operand), 2)
            expected = torch.cat((attention[..., :100], mlp), 2)
        elif case == "grad":
            grad = attention.clone().requires_grad_()
            args = ((grad, operand), 2)
            expected = torch.cat((grad, mlp), 2)
        elif case == "float32":
            args = ((attention.float(), operand), 2)
            expected = torch.cat((attention.float(), mlp), 2)
        else:
            args = ((attention[:1], pending.concat_operand(mlp[:1, :3])), 2)
            with pytest.raises(RuntimeError):
                torch.cat(*args)
            return
        got = torch.cat(*args)
        assert type(got) is torch.Tensor and torch.equal(got, expected)
        assert type(pending.concat_operand(mlp.float())) is torch.Tensor  # not a 16-bit input


# ---- a layer's output added into a gated residual stream ------------------------------------------------------


def gated_layer(seed: int = 12):
    layer = w4a4_layer(N, K, 32, torch.bfloat16, gen(seed, "cpu"), unsigned=False)
    layer.feeds_gated_residual = True
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, K, generator=g).bfloat16()
    residual = (4 * torch.randn(B, L, N, generator=g)).bfloat16()
    gate = torch.randn(B, 1, 3 * N, generator=g).bfloat16().chunk(3, dim=-1)[1]  # a strided chunk, as FLUX's
    return layer, x, residual, gate


@pytest.mark.parametrize("form", ["residual + gate * y", "residual + y * gate", "y * gate + residual", "+="])
def test_a_gated_output_is_added_into_the_residual_by_the_layer(form):
    layer, x, residual, gate = gated_layer()
    with pending.forced(False):
        plain = layer(x)
    assert type(plain) is torch.Tensor
    expected = residual + gate * plain  # ComfyUI's ops, as numerics.gated_residual defines them
    assert torch.equal(expected, numerics.gated_residual(residual, gate, plain))
    residuals = []
    call = kernels.W4A4Kernel.__call__

    def recorded(self, x, **kwargs):
        residuals.append(kwargs.get("residual"))
        return call(self, x, **kwargs)

    with pending.forced(True), pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.W4A4Kernel, "__call__", recorded)
        y = layer(x)
        assert type(y) is pending.PendingOutput and y.shape == (B, L, N) and residuals == []
        if form == "residual + gate * y":
            got = residual + gate * y
        elif form == "residual + y * gate":
            got = residual + y * gate
        elif form == "y * gate + residual":
            got = y * gate + residual
        else:
            got = residual.clone()
            target = got
            got += y * gate
            assert got is target
    assert type(got) is torch.Tensor and torch.equal(got, expected)
    (given,) = residuals
    assert isinstance(given, kernels.GatedResidual) and given.gate.shape == (B, N) and given.gate.is_contiguous()


def test_other_uses_of_a_pending_output_compute_it_as_pytorch_does():
    layer, x, residual, gate = gated_layer(13)
    with pending.forced(False):
        plain = layer(x)
    with pending.forced(True):
        assert torch.equal(layer(x) + 1, plain + 1)
        gated = layer(x) * gate
        assert type(gated) is pending.PendingOutput
        assert torch.equal(gated.float(), (plain * gate).float())
        assert torch.equal(residual - gate * layer(x), residual - gate * plain)  # not an addition: computed first
        per_token = torch.randn(B, L, N).bfloat16()  # not one row per batch: a plain product
        assert type(layer(x) * per_token) is torch.Tensor
        assert torch.equal(layer(x) * per_token, plain * per_token)
        assert torch.equal(residual + layer(x), residual + plain)  # no gate: a plain sum
        assert torch.equal(residual.float() + gate * layer(x), residual.float() + gate * plain)  # another dtype
        dense = torch.nn.Linear(N, 8, dtype=torch.bfloat16)
        assert torch.equal(dense(layer(x) * gate), dense(plain * gate))
    with pending.forced(True), torch.inference_mode():
        assert type(layer(x)) is pending.PendingOutput
    layer.feeds_gated_residual = False
    with pending.forced(True):
        assert type(layer(x)) is torch.Tensor
