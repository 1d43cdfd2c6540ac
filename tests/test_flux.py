"""FLUX model level: layer map, configuration from files, the quantizer, loading quantized files."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from svdquant import file_options, flux, numerics, pending
from svdquant import format as fmt
from svdquant.format import FormatError
from svdquant.linear import LoadedLinear, SVDQLinear, W4A16Linear
from tiny_flux import bf16_model, eager_and_compiled, quantized_model


def test_layer_map_of_flux1_dev():
    """The FLUX.1 linear shapes (K -> N) and which are 4-bit, at full size (../shared/REFERENCE.md)."""
    layers = flux.arch.linear_layers(flux.arch.FluxConfig())
    kinds = [spec.kind for spec in layers.values()]
    assert kinds.count(flux.arch.W4A4) == 19 * 8 + 38 * 2
    assert kinds.count(flux.arch.W4A16) == 19 * 2 + 38
    shape = {name: (spec.in_features, spec.out_features) for name, spec in layers.items()}
    assert shape["double_blocks.0.img_attn.qkv"] == (3072, 9216)
    assert shape["double_blocks.18.txt_mlp.0"] == (3072, 12288)
    assert shape["single_blocks.37.linear1"] == (3072, 21504)
    assert shape["single_blocks.0.linear2"] == (15360, 3072)
    assert shape["double_blocks.0.img_mod.lin"] == (3072, 18432)
    assert shape["single_blocks.0.modulation.lin"] == (3072, 9216)
    dense = {name for name, spec in layers.items() if spec.kind == flux.arch.DENSE}
    assert dense == {"img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
                     "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer",
                     "final_layer.adaLN_modulation.1", "final_layer.linear"}
    gelu = {name: spec.gelu_columns for name, spec in layers.items() if spec.gelu_columns}
    assert gelu["single_blocks.5.linear2"] == (3072, 15360) and gelu["double_blocks.3.img_mlp.2"] == (0, 12288)
    assert len(gelu) == 19 * 2 + 38


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_config_and_variant_from_tensor_shapes(guidance_embed):
    cfg, tensors = bf16_model(guidance_embed)
    assert flux.arch.config_from_tensors(tensors, {}) == cfg
    assert cfg.variant == ("dev" if guidance_embed else "schnell")
    model = quantized_model(guidance_embed)
    assert flux.arch.config_from_tensors(model.tensors, model.layers) == cfg


def test_quantized_file_describes_the_flux_layers(tmp_path):
    model = quantized_model(False)
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    specs = flux.arch.linear_layers(cfg)
    assert {name: desc["kind"] for name, desc in model.layers.items()} == \
        {name: spec.kind for name, spec in specs.items() if spec.kind != flux.arch.DENSE}
    h, m = cfg.hidden_size, cfg.mlp_hidden
    shift = model.tensors["single_blocks.1.linear2.shift"].float()
    assert (shift[:h] == 0).all() and (shift[h:] == numerics.GELU_SHIFT).all() and shift.shape == (h + m,)
    assert (model.tensors["double_blocks.0.txt_mlp.2.shift"].float() == numerics.GELU_SHIFT).all()
    assert [name for name, desc in model.layers.items() if desc.get("shift")] == \
        [name for name, spec in specs.items() if spec.gelu_columns]
    assert model.layers["single_blocks.0.linear1"]["rank"] == 32

    path = tmp_path / "tiny.safetensors"
    fmt.save_model(path, model)
    loaded, loaded_cfg = flux.files.load_flux(path)
    assert loaded_cfg == cfg and loaded.layers == model.layers
    assert loaded.tensors.keys() == model.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], t) for k, t in model.tensors.items())


def test_loaded_layers_become_what_the_file_stores():
    """LoadedLinear (whose load the ComfyUI custom operation shares) becomes at load an SVDQLinear,
    W4A16Linear or nn.Linear, built as the explicit constructors build them from the same tensors."""
    model = quantized_model(True)
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    loaded = flux.model.from_tensors(cfg, model.tensors)
    classes = {flux.arch.W4A4: SVDQLinear, flux.arch.W4A16: W4A16Linear, flux.arch.DENSE: torch.nn.Linear}
    gen = torch.Generator().manual_seed(0)
    for name, spec in flux.arch.linear_layers(cfg).items():
        layer = loaded.get_submodule(name)
        assert type(layer) is classes[spec.kind], name
        x = torch.randn(2, 5, spec.in_features, generator=gen).bfloat16()
        if spec.kind == flux.arch.DENSE:
            engine = torch.nn.Linear(spec.in_features, spec.out_features, dtype=torch.bfloat16)
            engine.load_state_dict({"weight": model.tensors[f"{name}.weight"], "bias": model.tensors[f"{name}.bias"]})
        else:
            engine = classes[spec.kind].from_tensors(model.layer_tensors(name))
        if spec.kind == flux.arch.W4A4:  # from_tensors moves the MLPs' GELU into their input layers
            expected = 0 if name.endswith("_mlp.0") else 3 * cfg.hidden_size if name.endswith("linear1") else None
            assert layer.gelu_from == expected, name
            engine.gelu_from = expected
        assert set(layer.state_dict()) == set(engine.state_dict()), name
        assert torch.equal(layer(x), engine(x)), name
    assert set(loaded.state_dict()) == set(model.tensors)


def test_mlp_gelu_moves_into_the_quantized_input_layers():
    """flux.fusion.fuse_mlp_gelu, fuse_single_block_concat and fuse_gated_residuals: the quantized model computes
    what it computed with separate GELU modules in its double blocks' MLPs and its single blocks (the activation
    now taken before the rounding to bf16), the same bits with the single blocks' concatenations and the layers'
    gated residuals pending, and dense models keep their GELU."""
    model = quantized_model(True)
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    separate = flux.model.Flux(cfg, flux.model.loaded_linear()).requires_grad_(False)
    separate.load_state_dict(model.tensors)
    fused = flux.model.from_tensors(cfg, model.tensors)
    gelus = 2 * cfg.depth + cfg.depth_single_blocks
    assert not [m for m in fused.modules() if isinstance(m, torch.nn.GELU)]
    assert sum(isinstance(m, torch.nn.GELU) for m in separate.modules()) == gelus
    assert sum(isinstance(m, flux.fusion.ConcatOperand) for m in fused.modules()) == cfg.depth_single_blocks
    assert flux.fusion.fuse_mlp_gelu(fused) == flux.fusion.fuse_single_block_concat(fused) == 0  # nothing left
    gated = [name for name, m in fused.named_modules() if getattr(m, "feeds_gated_residual", False)]
    assert sorted(gated) == sorted([f"double_blocks.{i}.{s}_{layer}" for i in range(cfg.depth) for s in ("img", "txt")
                                    for layer in ("attn.proj", "mlp.2")]
                                   + [f"single_blocks.{i}.linear2" for i in range(cfg.depth_single_blocks)])
    assert flux.fusion.fuse_gated_residuals(fused) == 0
    inputs = flux.synthetic.flux_inputs(cfg, seed=3, height=16, width=16)
    with torch.no_grad():
        ref = separate(inputs[0], torch.full((1,), 0.7), *inputs[1:], torch.full((1,), 3.5))
        out = fused(inputs[0], torch.full((1,), 0.7), *inputs[1:], torch.full((1,), 3.5))
        with pending.forced(True):  # the CPU standing in for a GPU with the kernels' concatenation and residual
            concatenated = fused(inputs[0], torch.full((1,), 0.7), *inputs[1:], torch.full((1,), 3.5))
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 2e-2
    assert torch.equal(concatenated, out)

    dense = flux.model.Flux(cfg, flux.model.dense_linear()).requires_grad_(False)
    assert flux.fusion.fuse_mlp_gelu(dense) == flux.fusion.fuse_single_block_concat(dense) == 0
    assert flux.fusion.fuse_gated_residuals(dense) == 0
    assert sum(isinstance(m, torch.nn.GELU) for m in dense.modules()) == gelus


def test_loaded_linear_checks_and_converts_what_it_loads():
    tensors = quantized_model(False).layer_tensors("double_blocks.0.img_attn.qkv")
    layer = LoadedLinear(256, 768, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="used before its state dict was loaded"):
        layer(torch.zeros(1, 256))
    layer.load_state_dict(tensors)
    assert type(layer) is SVDQLinear and layer.rank == layer.base_rank == 32 and layer.shift is None
    assert layer.qweight.dtype == torch.uint8 and layer.lora_down.dtype == layer.smooth.dtype == torch.float16
    dense = LoadedLinear(256, 768)
    dense.load_state_dict({"weight": torch.ones(768, 256), "bias": torch.zeros(768)})
    assert type(dense) is torch.nn.Linear and dense.weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="lora_up: shape"):
        LoadedLinear(256, 768).load_state_dict({**tensors, "lora_up": tensors["lora_up"][:, :16]})
    with pytest.raises(RuntimeError, match="Missing key.*bias"):  # the architecture has a bias
        LoadedLinear(256, 768).load_state_dict({k: v for k, v in tensors.items() if k != "bias"})
    with pytest.raises(RuntimeError, match="multiple of 64"):
        LoadedLinear(100, 768).load_state_dict(tensors)
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        LoadedLinear(256, 768).load_state_dict({"weight": torch.ones(768, 128), "bias": torch.zeros(768)})


def test_svdquant_beats_plain_w4a4_on_the_tiny_model():
    """Model-level fidelity after 4 sampling steps: the planted outliers hurt plain W4A4; SVDQuant's
    smoothing and low-rank branch recover most of it."""
    cfg, tensors = bf16_model(False)
    dense = flux.model.Flux(cfg, flux.model.dense_linear())
    dense.load_state_dict(tensors)
    noise, context, pooled = flux.synthetic.flux_inputs(cfg, seed=123, height=32, width=32)
    with torch.no_grad():
        ref = flux.model.sample_euler(dense, noise, context, pooled, steps=4).double()
        errors = {}
        for name, model in (("svdquant", quantized_model(False)),
                            ("plain", quantized_model(False, 0, False, rotation="none"))):
            out = flux.model.sample_euler(flux.model.from_tensors(cfg, model.tensors), noise, context, pooled, 4)
            errors[name] = float((out.double() - ref).norm() / ref.norm())
    assert errors["svdquant"] < 0.06
    assert errors["svdquant"] < errors["plain"] / 2


def test_pow2_scales_model():
    """quantize_flux(pow2_scales=True): every W4A4 layer has power-of-two weight scales, and the model
    with the restricted activations it is made for stays close to the exact-scale SVDQuant model."""
    cfg, tensors = bf16_model(False)
    model = quantized_model(False, pow2_scales=True)
    assert model.quantization["pow2_scales"] is True
    w4a4 = [name for name, layer in model.layers.items() if layer["kind"] == "w4a4"]
    assert w4a4 and all(numerics.pow2_weight_exponents(model.tensors[f"{name}.wscales"]) is not None
                        for name in w4a4)
    dense = flux.model.Flux(cfg, flux.model.dense_linear())
    dense.load_state_dict(tensors)
    noise, context, pooled = flux.synthetic.flux_inputs(cfg, seed=123, height=32, width=32)
    engine = flux.model.from_tensors(cfg, model.tensors)
    w4a4_layers = [m for m in engine.modules() if isinstance(m, SVDQLinear)]
    assert not any(m.pow2_activations for m in w4a4_layers)  # the global default: off
    file_options.apply_file_options(engine, model.quantization, pow2_activations=False)  # the loader's 'exact'
    assert not any(m.pow2_activations for m in w4a4_layers)
    file_options.apply_file_options(engine, model.quantization)  # what the loaders do with such a file by default
    assert all(m.pow2_activations for m in w4a4_layers)
    with torch.no_grad():
        ref = flux.model.sample_euler(dense, noise, context, pooled, steps=4).double()
        out = flux.model.sample_euler(engine, noise, context, pooled, 4)
    assert float((out.double() - ref).norm() / ref.norm()) < 0.06  # exact scales: 0.035, this: 0.042


def test_a_file_written_with_the_old_metadata_key_loads_the_same(tmp_path):
    """Files written before the name was settled say quantization["hopper_pow2"]: they load with
    the same metadata and the same activation-scale choice as a file that says "pow2_scales"."""
    model = quantized_model(False, pow2_scales=True)
    old = {k: v for k, v in model.quantization.items() if k != "pow2_scales"}
    old["hopper_pow2"] = True
    fmt.save_model(tmp_path / "new.safetensors", model)
    fmt.save_model(tmp_path / "old.safetensors", fmt.QuantizedModel(model.tensors, model.layers, model.model_type,
                                                                    model.model_config, old))
    assert "hopper_pow2" in fmt.read_header(tmp_path / "old.safetensors")["quantization"]
    (new, cfg), (loaded_old, _) = (flux.files.load_flux(tmp_path / f"{name}.safetensors") for name in ("new", "old"))
    assert loaded_old.quantization == new.quantization and new.quantization["pow2_scales"] is True
    engine = flux.model.from_tensors(cfg, loaded_old.tensors)
    file_options.apply_file_options(engine, loaded_old.quantization)
    assert all(m.pow2_activations for m in engine.modules() if isinstance(m, SVDQLinear))


def test_power_of_two_activations_can_be_chosen_for_any_file():
    cfg, _ = bf16_model(False)
    model = quantized_model(False)  # exact scales: the file asks for nothing
    engine = flux.model.from_tensors(cfg, model.tensors)
    w4a4_layers = [m for m in engine.modules() if isinstance(m, SVDQLinear)]
    file_options.apply_file_options(engine, model.quantization)
    assert w4a4_layers and not any(m.pow2_activations for m in w4a4_layers)
    file_options.apply_file_options(engine, model.quantization, pow2_activations=True)  # the loader's 'power-of-two'
    assert all(m.pow2_activations for m in w4a4_layers)


def test_calibration_records_what_each_layer_sees():
    cfg, tensors = bf16_model(False)
    model = flux.model.Flux(cfg, flux.model.dense_linear())
    model.load_state_dict(tensors)
    calls = flux.quantizer.calibration_inputs(cfg, count=3)
    seen = flux.quantizer.collect_calibration(model, ["single_blocks.0.linear2", "double_blocks.1.img_attn.qkv"],
                                             calls, max_tokens=100)
    # 3 calls of 16 text + 64 image tokens: 34 evenly spaced tokens per call, 100 kept
    assert seen["single_blocks.0.linear2"].shape == (100, cfg.hidden_size + cfg.mlp_hidden)
    assert seen["double_blocks.1.img_attn.qkv"].shape == (100, cfg.hidden_size)
    assert seen["single_blocks.0.linear2"][:, cfg.hidden_size:].min() >= -0.2  # GELU outputs


def _natural_file(tmp_path, name, **changes):
    model = quantized_model(False)
    path = tmp_path / name
    fmt.save_model(path, fmt.QuantizedModel(**{**vars(model), **changes}))
    return path


def test_files_that_are_not_usable_flux_models_are_named_errors(tmp_path):
    model = quantized_model(False)
    cfg, bf16 = bf16_model(False)
    save_file(bf16, str(tmp_path / "bf16.safetensors"))
    save_file({"weight": torch.zeros(4, 4)}, str(tmp_path / "other.safetensors"))
    good = _natural_file(tmp_path, "good.safetensors")
    (tmp_path / "truncated.safetensors").write_bytes(good.read_bytes()[:-1000])
    tensors = load_file(str(good))
    metadata = fmt.read_header(good)
    save_file(tensors, str(tmp_path / "version.safetensors"), metadata={**metadata, "format_version": "99"})
    four_heads = dict(model.model_config, num_heads=4)
    wider = dict(model.model_config, hidden_size=512, num_heads=4, axes_dim=[16, 56, 56])
    cases = {
        "bf16.safetensors": "not an SVDQuant FLUX model",
        "other.safetensors": "not an SVDQuant FLUX model",
        "truncated.safetensors": "not a readable safetensors file",
        "version.safetensors": "unsupported format version '99'",
        _natural_file(tmp_path, "sd3.safetensors", model_type="sd3").name: "SVDQuant sd3 model, not a FLUX model",
        _natural_file(tmp_path, "heads.safetensors", model_config=four_heads).name: "do not add up to the head dim 64",
        _natural_file(tmp_path, "wider.safetensors", model_config=wider).name: "is 1536x256, the model needs 3072x512",
        _natural_file(tmp_path, "missing.safetensors", tensors={k: v for k, v in model.tensors.items()
                                                                if k != "txt_in.weight"}).name:
            "missing tensor txt_in.weight",
        _natural_file(tmp_path, "extra.safetensors", tensors={**model.tensors, "lora_unet_x": torch.zeros(1)}).name:
            "not part of this FLUX model: lora_unet_x",
    }
    for name, problem in cases.items():
        with pytest.raises(FormatError, match=problem) as err:
            flux.files.load_flux(tmp_path / name)
        assert str(err.value).startswith(f"{name}: ")


def test_torch_compile_keeps_the_model_in_one_graph_with_each_quantized_layer_one_operator():
    """torch.compile of a quantized model (what ComfyUI's TorchCompileModel node does) traces the
    whole model into one graph: each 4-bit layer is one call of svdquant's operator, which runs what
    eager runs, instead of a graph break."""
    model = quantized_model(True)
    cfg = flux.arch.FluxConfig.from_dict(model.model_config)
    engine = flux.model.from_tensors(cfg, model.tensors)
    noise, context, pooled = flux.synthetic.flux_inputs(cfg, seed=2, height=16, width=16)
    args = (noise, torch.tensor([0.6]).bfloat16(), context, pooled, torch.tensor([3.5]).bfloat16())
    eager, compiled, reasons, operator_calls = eager_and_compiled(engine, args, backend="aot_eager")  # as traced
    assert torch.equal(compiled, eager)
    assert reasons == []
    assert operator_calls == sum(isinstance(m, (SVDQLinear, W4A16Linear)) for m in engine.modules()) > 0
