"""Importing nunchaku's single-file INT4 FLUX model (../shared/fixtures)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from svdquant import flux, numerics
from svdquant.format import FormatError

PACKED, NATURAL = "reference_flux_tiny.safetensors", "reference_flux_tiny.natural.safetensors"


@pytest.fixture(scope="module")
def imported(reference_fixture):
    return flux.files.load_flux(reference_fixture(PACKED))


@pytest.fixture(scope="module")
def natural(reference_fixture):
    path = reference_fixture(NATURAL)
    with safe_open(str(path), framework="pt") as f:
        layers = json.loads(f.metadata()["layers"])
    return load_file(str(path)), layers


def test_config_and_variant_come_from_the_file(imported):
    model, cfg = imported
    assert cfg == flux.arch.FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1)
    assert cfg.variant == "dev"
    assert flux.arch.config_from_tensors(model.tensors, model.layers) == cfg  # the shapes say the same


def test_import_yields_the_natural_parameters_bit_for_bit(imported, natural):
    model, _ = imported
    tensors, (nat, nat_layers) = model.tensors, natural

    def same(ours, theirs, what):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), what

    assert set(model.layers) == set(nat_layers)
    for name, desc in nat_layers.items():
        assert model.layers[name]["kind"] == desc["kind"], name
        if desc["kind"] == "w4a4":
            same(numerics.unpack_int4(tensors[f"{name}.qweight"], signed=True), nat[f"{name}.codes"], name)
            same(tensors[f"{name}.wscales"].t(), nat[f"{name}.wscales"], name)
            for field in ("smooth", "lora_down", "lora_up", "bias"):
                same(tensors[f"{name}.{field}"], nat[f"{name}.{field}"], f"{name}.{field}")
            # smooth_orig is stored where it differs from smooth (the factor folded upstream)
            same(tensors.get(f"{name}.smooth_orig", tensors[f"{name}.smooth"]), nat[f"{name}.smooth_orig"], name)
            assert (f"{name}.shift" in tensors) == (f"{name}.shift" in nat), name
            if f"{name}.shift" in nat:
                same(tensors[f"{name}.shift"], nat[f"{name}.shift"], f"{name}.shift")
        else:
            codes = numerics.unpack_int4(tensors[f"{name}.qweight"], signed=False)
            weight = numerics.dequantize_w4a16(codes, tensors[f"{name}.wscales"], tensors[f"{name}.wzeros"])
            same(weight.to(torch.bfloat16), nat[f"{name}.weight"], name)
            same(tensors[f"{name}.wscales"].t(), nat[f"{name}.wscales"], name)
            same(tensors[f"{name}.bias"], nat[f"{name}.bias"], f"{name}.bias")
    unquantized = {k for k in nat if k.rsplit(".", 1)[0] not in nat_layers}
    assert {k for k in tensors if k.rsplit(".", 1)[0] not in model.layers} == unquantized
    for key in unquantized:
        same(tensors[key], nat[key], key)


class Float64Layer(nn.Module):
    """One layer computed in float64 from the fixture's natural parameters, as its README defines:
    W4A4  y = dequant(Q((x + shift) / smooth)) @ (codes * wscales)^T + (x @ lora_down) @ lora_up^T + bias;
    W4A16 / 16-bit  y = x @ weight^T + bias."""

    def __init__(self, name, nat, kind):
        super().__init__()
        p = {k[len(name) + 1:]: v.double() for k, v in nat.items() if k.startswith(name + ".")}
        self.kind, self.p = kind, p
        if kind == "w4a4":
            self.weight = p["codes"] * p["wscales"].repeat_interleave(64, dim=1)

    def forward(self, x):
        x = x.double()
        if self.kind != "w4a4":
            return x @ self.p["weight"].t() + self.p["bias"]
        shift = self.p.get("shift", torch.zeros_like(self.p["smooth"]))
        v = ((x + shift) / self.p["smooth"]).reshape(*x.shape[:-1], -1, 64)
        unsigned = (shift > 0).reshape(-1, 64)[:, 0]
        v = torch.where(unsigned[:, None], v.clamp_min(0), v)
        qmax = torch.where(unsigned, 15.0, 7.0).double()
        scale = (v.abs().amax(-1) / qmax).to(torch.bfloat16).double()  # activation scales are bf16
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
        lo = torch.where(unsigned, 0.0, -8.0).double()[:, None]
        codes = torch.maximum(torch.minimum(torch.round(v / safe), qmax[:, None]), lo)
        act = (codes * scale[..., None]).reshape(x.shape)
        return act @ self.weight.t() + (x @ self.p["lora_down"]) @ self.p["lora_up"].t() + self.p["bias"]


def float64_model(cfg, nat, nat_layers, keep_folded_one=False):
    """The FLUX forward with every linear replaced by its Float64Layer (keep_folded_one: a wrong
    import that leaves the reference's +1 in the modulation biases, as a control)."""
    model = flux.model.Flux(cfg, flux.model.dense_linear(torch.float64)).double()
    model.load_state_dict({k: v for k, v in nat.items() if k.endswith(".scale")}, strict=False)
    for name, spec in flux.arch.linear_layers(cfg).items():
        parent, _, child = name.rpartition(".")
        kind = nat_layers.get(name, {}).get("kind", "dense")
        layer = Float64Layer(name, nat, kind)
        if keep_folded_one and kind == "w4a16":
            chunks = nat_layers[name]["chunks"]
            h = spec.out_features // chunks
            for c in {1, chunks - 2}:
                layer.p["bias"][c * h:(c + 1) * h] += 1.0
        model.get_submodule(parent).register_module(child, layer)
    return model


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def _model_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, 16, generator=gen)
    context, pooled = torch.randn(1, 12, 4096, generator=gen), torch.randn(1, 768, generator=gen)
    return x, torch.tensor([0.6]), context, pooled, torch.tensor([3.5])


def test_imported_layers_match_a_float64_computation(imported, natural):
    """Every layer of the imported model, on the inputs it sees in a forward pass (modulated
    LayerNorm outputs, attention outputs, GELU outputs), against the float64 definition."""
    model, cfg = imported
    nat, nat_layers = natural
    engine = flux.model.from_tensors(cfg, model.tensors)
    calls = {}

    def record(name):
        def hook(module, args, out):
            calls[name] = (args[0], out)
        return hook

    for name in flux.arch.linear_layers(cfg):
        engine.get_submodule(name).register_forward_hook(record(name))
    engine(*(a.bfloat16() for a in _model_inputs(0)))
    assert set(calls) == set(flux.arch.linear_layers(cfg))
    for name, (x, out) in calls.items():
        ref = Float64Layer(name, nat, nat_layers.get(name, {}).get("kind", "dense"))(x)
        # an MLP input layer applies the GELU too (flux.fusion.fuse_mlp_gelu)
        numerics.gelu_channels(ref, getattr(engine.get_submodule(name), "gelu_from", None))
        assert out.dtype == torch.bfloat16
        # bf16 output rounding, and the odd activation code on the other side of a rounding
        # boundary (computed in float32 in the engine, float64 here)
        assert relative_error(out, ref) < 5e-3, name
    gelu_out = calls["single_blocks.0.linear2"][0][..., cfg.hidden_size:]
    assert gelu_out.min() < 0  # the shifted unsigned quantization was exercised on negative inputs


def test_imported_model_matches_a_float64_computation(imported, natural):
    """The whole forward. Activation quantization of this random-weight model is chaotic: rounding
    the float64 model's inputs to bf16 alone moves its output by about 7%, so the bound is loose;
    a control import that keeps the reference's +1 in the modulation biases lands at about 34%."""
    model, cfg = imported
    nat, nat_layers = natural
    args = _model_inputs(1)
    ours = flux.model.from_tensors(cfg, model.tensors)(*(a.bfloat16() for a in args))
    with torch.no_grad():
        ref = float64_model(cfg, nat, nat_layers)(*(a.double() for a in args))
        control = float64_model(cfg, nat, nat_layers, keep_folded_one=True)(*(a.double() for a in args))
    assert relative_error(ours, ref) < 0.15
    assert relative_error(control, ref) > 0.3


def _write(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_reference_files_that_cannot_be_imported_are_named_errors(tmp_path, reference_fixture):
    packed = load_file(str(reference_fixture(PACKED)))
    with safe_open(str(reference_fixture(PACKED)), framework="pt") as f:
        metadata = f.metadata()

    fp4 = dict(metadata, quantization_config=json.dumps({"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all"}}))
    cases = {
        "nvfp4.safetensors": (packed, fp4, "NVFP4"),
        "qwen.safetensors": (packed, dict(metadata, model_class="NunchakuQwenImageTransformer2DModel"),
                             "not a FLUX model"),
        "missing.safetensors": ({k: v for k, v in packed.items() if "mlp_fc2.lora_up" not in k}, metadata,
                                "missing tensor transformer_blocks.0.mlp_fc2.lora_up"),
        "extra.safetensors": ({**packed, "transformer_blocks.0.ff.net.0.weight": torch.zeros(2)}, metadata,
                              "tensors this importer does not know: transformer_blocks.0.ff.net.0.weight"),
        "bad_modulation.safetensors": ({**packed, "transformer_blocks.0.norm1.linear.wscales":
                                        torch.ones(16, 1536, dtype=torch.bfloat16)}, metadata,
                                       "non-zero padding rows"),
    }
    for name, (tensors, meta, problem) in cases.items():
        with pytest.raises(FormatError, match=problem) as err:
            flux.files.load_flux(_write(tmp_path / name, tensors, meta))
        assert str(err.value).startswith(name)


def _swapped(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[::-1])


# what a header corruption that keeps every tensor's byte count does: the same bytes read with
# another shape or dtype (other sizes are the header check's, tests/test_format.py)
@pytest.mark.parametrize("key, corrupt, problem", [
    ("single_transformer_blocks.0.mlp_fc1.lora_down", _swapped, r"has shape \(32, 256\), expected \(256, \*\)"),
    ("transformer_blocks.0.qkv_proj.lora_up", _swapped, r"has shape \(32, 768\), expected \(768, 32\)"),
    ("transformer_blocks.0.qkv_proj.wscales", _swapped, r"has shape \(768, 4\), expected \(4, 768\)"),
    ("transformer_blocks.0.mlp_fc2.qweight", _swapped, r"has shape \(512, 256\), expected \(256, 512\)"),
    ("transformer_blocks.0.norm1.linear.qweight", _swapped, r"has shape \(128, 384\), expected \(384, \*\)"),
    ("transformer_blocks.0.norm1.linear.wzeros", _swapped, r"has shape \(1536, 4\), expected \(\*, 1536\)"),
    ("transformer_blocks.0.norm1.linear.qweight", lambda t: t.view(torch.float32), "has dtype torch.float32, "
                                                                                   "expected integers"),
    ("transformer_blocks.0.qkv_proj.smooth", lambda t: t.view(torch.float16),
     "has dtype torch.float16, unlike the torch.bfloat16 of the layer's other tensors"),
    ("single_transformer_blocks.0.norm.linear.bias", lambda t: t.view(torch.float16),
     "has dtype torch.float16, unlike the torch.bfloat16 of the layer's other tensors"),
], ids=["w4a4-lora_down-shape", "w4a4-lora_up-shape", "w4a4-wscales-shape", "w4a4-qweight-shape",
        "w4a16-qweight-shape", "w4a16-wzeros-shape", "w4a16-qweight-float", "w4a4-smooth-f16", "w4a16-bias-f16"])
def test_a_reference_tensor_read_with_another_shape_or_dtype_is_named(tmp_path, reference_fixture, key, corrupt,
                                                                      problem):
    packed = load_file(str(reference_fixture(PACKED)))
    with safe_open(str(reference_fixture(PACKED)), framework="pt") as f:
        metadata = f.metadata()
    packed[key] = corrupt(packed[key])
    with pytest.raises(FormatError, match=f"^corrupt.safetensors: cannot import the nunchaku layout: tensor {key} "
                                          f"{problem}$"):
        flux.files.load_flux(_write(tmp_path / "corrupt.safetensors", packed, metadata))
