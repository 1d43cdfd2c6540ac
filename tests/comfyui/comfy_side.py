"""What the ComfyUI tests run inside ComfyUI's own Python (tests/test_comfyui.py starts it with
the ComfyUI checkout as working directory). Commands:

  taesd OUT                      write a TAESD-layout VAE with 16 latent channels, random weights
  load PACK MODEL DENSE INPUTS OUT
                                 load MODEL through the pack's loader node code, run ComfyUI's FLUX
                                 on INPUTS (and again after a low-VRAM partial load); run the same
                                 model with its 4-bit layers computing the numerics definition
                                 (svdquant.kernels' reference functions), and the same ComfyUI
                                 model class with ComfyUI's own operations and the 16-bit weights
                                 in DENSE; write the outputs and what ComfyUI reports about the
                                 model to OUT
  lora PACK MODEL INPUTS LORAS OUT
                                 the same model with LoRAs from the folder LORAS added the way
                                 ComfyUI's LoraLoaderModelOnly adds them and by the pack's LoRA Stack,
                                 loaded by ComfyUI's model management (full and low-VRAM loads,
                                 partial unloads, detaches), and the same ComfyUI model with the
                                 LoRAs set by the engine (svdquant.lora); write the outputs of
                                 each step and facts about the layers to OUT
  fp8_sizing PACK MODEL INPUTS OUT
                                 MODEL loaded in 4-bit and in FP8 execution with the CPU standing in
                                 for a GPU where FP8 execution runs: ComfyUI's model size, a partial
                                 load under a budget that fits the 4-bit model but not the FP8
                                 weights (which layers stay offloaded, the loaded size, the output),
                                 the saved state dict; and the size where FP8 execution does not run
  pending_inputs PACK MODEL INPUTS OUT
                                 MODEL run with the pack's pending tensors (LayerNorm, concatenation)
                                 forced on (the CPU standing in for a GPU), eagerly and through
                                 torch.compile, with them off, and with the LayerNorms' consumers deciding:
                                 the outputs, which layers received a pending tensor and handed it to their
                                 kernel, and each LayerNorm's consumer
  t5 PACK OUT                    ComfyUI's T5 encoder at a small width with the pack's 4-bit text
                                 encoder operations, from bf16 and from scaled fp8 weights, beside
                                 the dense model and the dense model with the dequantized weights
"""

import json
import os
import sys

sys.path.insert(0, os.getcwd())
import comfy.cli_args  # noqa: E402

# before ComfyUI reads them at import: the CPU, and PyTorch's attention (what the engine uses)
comfy.cli_args.args.cpu = True
comfy.cli_args.args.use_pytorch_cross_attention = True

import importlib.util  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def taesd(out: str) -> None:
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=16)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, param in vae.state_dict().items():  # ComfyUI leaves these uninitialised
        tensors[name] = torch.ones_like(param) if name == "vae_scale" else \
            torch.zeros_like(param) if name == "vae_shift" else 0.05 * torch.randn(param.shape, generator=gen)
    save_file(tensors, out)


def import_pack(pack: str) -> None:
    """The pack as ComfyUI imports a custom node folder, under the name svdquant_pack."""
    spec = importlib.util.spec_from_file_location("svdquant_pack", os.path.join(pack, "__init__.py"),
                                                  submodule_search_locations=[pack])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def forward(diffusion_model, inputs):
    with torch.no_grad():
        return diffusion_model(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"],
                               guidance=inputs.get("guidance"))


def reference_forward(layer):
    """The forward of a 4-bit layer as the numerics definition (svdquant.kernels' reference
    functions on the layer's own tensors), whatever kernels the pack would pick."""
    from svdquant_pack.svdquant import kernels, linear

    def forward(x):
        flat = x.reshape(-1, x.shape[-1])
        if isinstance(layer, linear.SVDQLinear):
            y = kernels.svdq_linear_reference(flat, layer.qweight, layer.wscales, layer.smooth, layer.lora_down,
                                              layer.lora_up, layer.bias, layer.shift, layer.unsigned_groups,
                                              layer.pow2_activations, layer.gelu_from, layer.rotation)
        else:
            y = kernels.w4a16_linear_reference(flat, layer.qweight, layer.wscales, layer.wzeros, layer.bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


def stock_flux(pack_loader, model_file: str, dense_file: str):
    """ComfyUI's FLUX model class for MODEL's configuration, built with ComfyUI's own operations
    and loaded by ComfyUI's own load_model_weights (its key conversions included) from DENSE."""
    import comfy.model_detection

    from svdquant_pack.svdquant import flux

    tensors = load_file(dense_file)
    unet_config = pack_loader.flux_unet_config(model_file, tensors, flux.files.load_flux(model_file)[1])
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, tensors)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model(tensors, "")
    expected = set(model.diffusion_model.state_dict())
    model.load_model_weights(tensors, "")
    return model, expected


def unet_config_cases(pack_loader, model_file: str) -> dict:
    """The loader's unet config as this ComfyUI's FluxParams takes it: from its detection, without
    its detection (a ComfyUI whose detection does not know the file), and against a FluxParams that
    requires a field the pack does not know (the error message)."""
    import dataclasses
    from unittest import mock

    import comfy.ldm.flux.model
    import comfy.model_detection

    from svdquant_pack.svdquant import flux

    model, cfg = flux.files.load_flux(model_file)

    def fluxparams_accepts(unet_config):
        params = {k: v for k, v in unet_config.items() if k != "image_model"}
        return comfy.ldm.flux.model.FluxParams(**params) is not None

    out = {"detected": fluxparams_accepts(pack_loader.flux_unet_config(model_file, model.tensors, cfg))}
    with mock.patch.object(comfy.model_detection, "detect_unet_config", return_value=None):
        out["undetected"] = fluxparams_accepts(pack_loader.flux_unet_config(model_file, model.tensors, cfg))
    future = dataclasses.make_dataclass("FluxParams", [("future_field", int, dataclasses.field(kw_only=True))],
                                        bases=(comfy.ldm.flux.model.FluxParams,))
    with mock.patch.object(comfy.ldm.flux.model, "FluxParams", future):
        try:
            pack_loader.flux_unet_config(model_file, model.tensors, cfg)
            out["future_field"] = None
        except ValueError as exc:
            out["future_field"] = str(exc)
    return out


def load(pack: str, model_file: str, dense_file: str, inputs_file: str, out: str) -> None:
    import_pack(pack)
    from svdquant_pack.nodes import loader
    from svdquant_pack.nodes.lora import quantized_layers

    patcher = loader.load_svdquant_flux(model_file, torch.bfloat16)
    inputs = load_file(inputs_file)
    diffusion_model = patcher.model.diffusion_model

    def run():
        return forward(diffusion_model, inputs)

    outputs = {"full": run()}
    size = patcher.model_size()
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=size // 3)
    # the layers ComfyUI's low-VRAM mode left in offload memory (it marks them so)
    lowvram = [name for name, m in diffusion_model.named_modules() if hasattr(m, "prev_comfy_cast_weights")]
    outputs["lowvram"] = run()
    patcher.unpatch_model(torch.device("cpu"))

    reference = loader.load_svdquant_flux(model_file, torch.bfloat16).model
    for layer in quantized_layers(reference).values():
        layer.forward = reference_forward(layer)
    outputs["reference"] = forward(reference.diffusion_model, inputs)

    stock, stock_keys = stock_flux(loader, model_file, dense_file)
    outputs["stock_dense"] = forward(stock.diffusion_model, inputs)

    layers = {name: type(m).__name__ for name, m in diffusion_model.named_modules() if hasattr(m, "in_features")}
    facts = {"model_class": type(patcher.model).__name__, "model_type": patcher.model.model_type.name,
             "config_class": type(patcher.model.model_config).__name__,
             "unet_config": unet_config_cases(loader, model_file),
             "model_size": size, "sampling_buffers": sum(b.numel() * b.element_size()
                                                         for b in patcher.model.model_sampling.buffers()),
             "layers": layers, "lowvram_layers": lowvram,
             "stock_keys_loaded": stock_keys == set(stock.model_config.process_unet_state_dict(
                 load_file(dense_file))),
             "gelu_from": {name: m.gelu_from for name, m in diffusion_model.named_modules()
                           if getattr(m, "gelu_from", None) is not None},
             "gelu_modules": [name for name, m in diffusion_model.named_modules() if isinstance(m, torch.nn.GELU)]}
    save_file({k: v.contiguous() for k, v in outputs.items()}, out, metadata={"facts": json.dumps(facts)})


def lora(pack: str, model_file: str, inputs_file: str, lora_dir: str, out: str) -> None:
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths

    import_pack(pack)
    from svdquant_pack.nodes.loader import load_svdquant_flux
    from svdquant_pack.nodes.lora import SVDQuantLoraStack, quantized_layers

    folder_paths.add_model_folder_path("loras", lora_dir, is_default=True)
    base = load_svdquant_flux(model_file, torch.bfloat16)
    inputs = load_file(inputs_file)
    layers = quantized_layers(base.model)
    cpu = torch.device("cpu")

    def lora_loader_model_only(model, name, strength):  # what LoraLoaderModelOnly does with the file
        lora_sd = comfy.utils.load_torch_file(os.path.join(lora_dir, name), safe_load=True)
        return comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)[0]

    def lora_stack(model, *entries):
        slots = {}
        for slot in range(1, 5):
            name, strength = entries[slot - 1] if slot <= len(entries) else ("None", 1.0)
            slots[f"lora_{slot}"], slots[f"strength_{slot}"] = name, strength
        return SVDQuantLoraStack.execute(model=model, **slots).result[0]

    def run(patcher):  # as a sampler does: model management loads the patcher, then the model runs
        comfy.model_management.load_models_gpu([patcher])
        return forward(patcher.model.diffusion_model, inputs)

    def low_rank_state():
        return {name: (layer.lora_down.clone() if layer.lora_down is not None else None,
                       layer.lora_up.clone() if layer.lora_up is not None else None) for name, layer in layers.items()}

    def same_state(a, b):
        return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                   for name in a for x, y in zip(a[name], b[name]))

    def lora_ranks():
        return {name: layer.lora_down.shape[1] - getattr(layer, "base_rank", 0)
                for name, layer in layers.items() if layer.lora_down is not None}

    outputs, facts = {}, {}
    img_in = base.model.diffusion_model.img_in
    img_in_weight = img_in.weight.detach().clone()
    outputs["base"] = run(base)
    original = low_rank_state()
    facts["weight_keys"] = sorted(k for k in base.model.state_dict() if k.endswith(".weight") and
                                  k[:-len(".weight")] in layers)

    outputs["kohya_1"] = run(lora_loader_model_only(base, "kohya.safetensors", 1.0))
    facts["lora_ranks_kohya_1"] = lora_ranks()
    outputs["kohya_05_after_1"] = run(lora_loader_model_only(base, "kohya.safetensors", 0.5))
    stacked = lora_loader_model_only(lora_loader_model_only(base, "kohya.safetensors", 0.5), "peft.safetensors", -0.75)
    outputs["kohya_05_peft"] = run(stacked)
    facts["img_in_patched"] = not torch.equal(img_in.weight, img_in_weight)
    outputs["base_again"] = run(base)
    facts["restored_by_base"] = same_state(low_rank_state(), original)
    facts["img_in_restored"] = torch.equal(img_in.weight, img_in_weight)

    comfy.model_management.unload_all_models()
    outputs["kohya_05_fresh"] = run(lora_loader_model_only(base, "kohya.safetensors", 0.5))

    with_stack = lora_stack(lora_loader_model_only(base, "kohya.safetensors", 0.5), ("xlabs.safetensors", 0.8),
                            ("None", 1.0), ("peft.safetensors", 0.0))
    outputs["kohya_05_stack_xlabs"] = run(with_stack)
    comfy.model_management.unload_all_models()
    facts["restored_by_unload"] = same_state(low_rank_state(), original)

    # ComfyUI's low-VRAM load (what load_models_gpu does with little free memory): a third of the
    # model loaded, the rest left in offload memory with LowVramPatch functions on the weights
    size = with_stack.model_size()
    comfy.model_management.LoadedModel(with_stack).model_load(lowvram_model_memory=size // 3)
    offloaded = [name for name, m in layers.items() if hasattr(m, "prev_comfy_cast_weights")]
    facts["lowvram"] = {"model_lowvram": with_stack.model.model_lowvram, "offloaded_quantized": offloaded,
                        "lora_ranks": lora_ranks()}
    outputs["lowvram"] = forward(with_stack.model.diffusion_model, inputs)
    with_stack.partially_unload(cpu, memory_to_free=size // 6)
    outputs["after_partial_unload"] = forward(with_stack.model.diffusion_model, inputs)
    with_stack.detach()
    facts["restored_by_detach"] = same_state(low_rank_state(), original)

    facts["errors"] = {}
    for name in ("lokr", "dora", "bias"):
        try:
            run(lora_loader_model_only(base, f"{name}.safetensors", 1.0))
            facts["errors"][name] = None
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            facts["errors"][name] = f"{type(exc).__name__}: {exc}"
    facts["restored_after_error"] = same_state(low_rank_state(), original)
    outputs["base_after_error"] = run(base)

    # the reference: the same ComfyUI model with the LoRAs set by the engine (svdquant.lora), so
    # both sides run this ComfyUI's arithmetic
    from svdquant_pack.svdquant import lora as engine_lora
    from svdquant_pack.svdquant.flux import arch as flux_arch
    from svdquant_pack.svdquant.flux import lora_keys

    reference = load_svdquant_flux(model_file, torch.bfloat16).model.diffusion_model
    files = {name: lora_keys.load_lora(os.path.join(lora_dir, f"{name}.safetensors"))
             for name in ("kohya", "peft", "xlabs")}
    for tag, stack in (("base", ()), ("kohya_1", (("kohya", 1.0),)), ("kohya_05", (("kohya", 0.5),)),
                       ("kohya_05_peft", (("kohya", 0.5), ("peft", -0.75))),
                       ("kohya_05_xlabs", (("kohya", 0.5), ("xlabs", 0.8)))):
        engine_lora.set_model_loras(reference, [(files[name], strength) for name, strength in stack],
                                    v_rows_read_by=flux_arch.V_ROWS_READ_BY)
        outputs[f"reference_{tag}"] = forward(reference, inputs)
    save_file({k: v.contiguous() for k, v in outputs.items()}, out, metadata={"facts": json.dumps(facts)})


def fp8_sizing(pack: str, model_file: str, inputs_file: str, out: str) -> None:
    from unittest import mock

    import comfy.model_management

    import_pack(pack)
    from svdquant_pack.nodes import loader
    from svdquant_pack.svdquant import kernels, linear
    from svdquant_pack.svdquant.families import fp8

    cpu = torch.device("cpu")
    inputs = load_file(inputs_file)
    facts, outputs, asked = {}, {}, set()
    # on this CPU no layer runs FP8: FP8 execution is sized as stored
    facts["size_where_fp8_does_not_run"] = loader.load_svdquant_flux(model_file, torch.bfloat16,
                                                                     fp8_execution=True).model_size()

    def fp8_runs_here(device, dtype, out_features):  # the CPU standing in for an H100, bfloat16 or not
        asked.add((device.type, str(dtype)))
        return True

    with mock.patch.object(kernels, "fp8_execution_runs", fp8_runs_here):
        patchers = {mode: loader.load_svdquant_flux(model_file, torch.bfloat16, fp8_execution=mode == "fp8")
                    for mode in ("4bit", "fp8")}
        facts["asked"] = sorted(asked)
        diffusion_model = patchers["fp8"].model.diffusion_model
        # what each W4A4 layer's FP8 weights take: the tensors the fp8 family keeps (computed here on the CPU)
        facts["fp8_bytes"] = {name: sum(t.nbytes for t in fp8.weights(m.w4a4_kernel()) if t is not None)
                              for name, m in diffusion_model.named_modules() if isinstance(m, linear.SVDQLinear)}
        facts["model_size"] = {mode: patcher.model_size() for mode, patcher in patchers.items()}
        facts["clone_size"] = patchers["fp8"].clone().model_size()
        outputs["full"] = forward(diffusion_model, inputs)
        # the dtype a layer's inputs have when ComfyUI runs the model (a sampler's call)
        layer = diffusion_model.double_blocks[0].img_attn.qkv
        hook = layer.register_forward_pre_hook(lambda m, args: facts.update(input_dtype=str(args[0].dtype)))
        with torch.no_grad():
            patchers["fp8"].model.apply_model(inputs["x"], inputs["timestep"], c_crossattn=inputs["context"],
                                              y=inputs["y"], guidance=inputs["guidance"])
        hook.remove()

        budget = facts["model_size"]["4bit"] + sum(facts["fp8_bytes"].values()) // 2
        facts["budget"], facts["partial"] = budget, {}
        for mode, patcher in patchers.items():
            patcher.patch_model(device_to=cpu, lowvram_model_memory=budget)
            model = patcher.model.diffusion_model
            # the modules ComfyUI sizes for a partial load (those with weights of their own, or castable)
            sized = {name: m for name, m in model.named_modules()
                     if (hasattr(m, "comfy_cast_weights") or list(m.parameters(recurse=False)))
                     and len(list(m.parameters())) == len(list(m.parameters(recurse=False)))}
            # the layers ComfyUI's low-VRAM mode left in offload memory (it marks them so)
            offloaded = sorted(name for name, m in sized.items() if hasattr(m, "prev_comfy_cast_weights"))
            fp8_bytes = facts["fp8_bytes"] if mode == "fp8" else {}
            loaded = sum(comfy.model_management.module_size(m) + fp8_bytes.get(name, 0)
                         for name, m in sized.items() if name not in offloaded)
            facts["partial"][mode] = {"lowvram": patcher.model.model_lowvram, "offloaded": offloaded,
                                      "loaded_size": patcher.loaded_size(), "loaded_modules_size": loaded}
            if mode == "fp8":
                outputs["partial"] = forward(model, inputs)
            patcher.unpatch_model(cpu)

    def saved(patcher):  # what ComfyUI's checkpoint saving writes for the diffusion model
        owner = patcher if hasattr(patcher, "state_dict_for_saving") else patcher.model
        return {key: int(t.nbytes) for key, t in owner.state_dict_for_saving().items()}

    facts["saved"] = {mode: saved(patcher) for mode, patcher in patchers.items()}
    save_file({k: v.contiguous() for k, v in outputs.items()}, out, metadata={"facts": json.dumps(facts)})


def pending_inputs(pack: str, model_file: str, inputs_file: str, out: str) -> None:
    from unittest import mock

    import torch._dynamo

    import_pack(pack)
    from svdquant_pack.nodes import loader
    from svdquant_pack.svdquant import kernels, linear, pending

    diffusion_model = loader.load_svdquant_flux(model_file, torch.bfloat16).model.diffusion_model
    inputs = load_file(inputs_file)
    names = {id(m): name for name, m in diffusion_model.named_modules()}
    received, handed = [], []  # (layer, "norm" or "concat"), and the same kinds handed to a kernel
    quantized_forward, kernel_call = linear.quantized_forward, kernels.W4A4Kernel.__call__

    def recording_forward(layer, x, *args):
        if isinstance(x, pending.Pending) and x.kernel_input() is not None:
            received.append([names[id(layer)], "norm" if isinstance(x, pending.PendingNorm) else "concat"])
        return quantized_forward(layer, x, *args)

    def recording_call(kernel, x, norm=None, residual=None, out=None):
        if norm is not None or isinstance(x, kernels.Concat):
            handed.append("norm" if norm is not None else "concat")
        if residual is not None:
            handed.append("residual")
        return kernel_call(kernel, x, norm=norm, residual=residual, out=out)

    outputs, facts = {}, {}
    with mock.patch.object(linear, "quantized_forward", recording_forward), \
            mock.patch.object(kernels.W4A4Kernel, "__call__", recording_call):
        with pending.forced(False):
            outputs["off"] = forward(diffusion_model, inputs)
        facts["off"] = {"received": received[:], "handed": handed[:]}
        received.clear()
        handed.clear()
        with pending.forced(True):
            outputs["on"] = forward(diffusion_model, inputs)
        facts["on"] = {"received": received[:], "handed": handed[:]}
        received.clear()
        handed.clear()
        # not forced: a LayerNorm stays pending where the layer the loader marked as its consumer takes the prologue
        # (the CPU standing in for a GPU where every 4-bit layer does but the first double block's, offloaded)
        with mock.patch.object(linear.SVDQLinear, "takes_norm_prologue",
                               lambda layer, x: not names[id(layer)].startswith("double_blocks.0.")):
            outputs["by_consumer"] = forward(diffusion_model, inputs)
        facts["by_consumer"] = {"received": received[:], "handed": handed[:]}
        received.clear()
        torch._dynamo.reset()
        with pending.forced(True), torch.no_grad():
            compiled = torch.compile(diffusion_model, backend="eager")
            outputs["compiled_on"] = compiled(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"],
                                              guidance=inputs.get("guidance"))
        facts["compiled_on"] = {"received": received[:]}
    facts["consumers"] = {name: names[id(norm.prologue_consumer())] for name, norm in diffusion_model.named_modules()
                          if getattr(norm, "prologue_consumer", None) is not None}
    save_file({k: v.contiguous() for k, v in outputs.items()}, out, metadata={"facts": json.dumps(facts)})


def t5(pack: str, out: str) -> None:
    import comfy.ops
    import comfy.text_encoders.t5

    import_pack(pack)
    from svdquant_pack.nodes.ops import T5W4A16Ops
    from svdquant_pack.svdquant import numerics

    class NarrowT5W4A16Ops(T5W4A16Ops):  # quantize from 128 wide: the test's T5 is that narrow
        class Linear(T5W4A16Ops.Linear):
            min_features = 128

    config = {"d_ff": 320, "d_kv": 32, "d_model": 128, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
              "model_type": "t5", "num_heads": 4, "num_layers": 2, "vocab_size": 100}

    def build(ops, state):
        model = comfy.text_encoders.t5.T5(config, torch.bfloat16, "cpu", ops)
        missing, unexpected = model.load_state_dict(state, strict=False)
        return model, missing, unexpected

    gen = torch.Generator().manual_seed(0)
    dense, _, _ = build(comfy.ops.manual_cast, {})
    state = {}
    for name, t in dense.state_dict().items():  # ComfyUI leaves these uninitialised
        scale = 1.0 if name.startswith("shared") else 0.05
        state[name] = torch.ones_like(t) if "layer_norm" in name else (scale * torch.randn(t.shape, generator=gen)).to(t.dtype)
    linears = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)]
    # the same weights as fp8 with a per-tensor scale, as ComfyUI's scaled fp8 T5 files hold them
    fp8 = dict(state)
    for n in linears:
        w = state[f"{n}.weight"].float()
        scale = w.abs().max() / 448
        fp8[f"{n}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        fp8[f"{n}.scale_weight"] = scale.reshape(())
    # what the 4-bit layers should compute: the dense model with their dequantized weights
    def dequantized(source):
        out = dict(source)
        for n in linears:
            w = source[f"{n}.weight"].float() * source.get(f"{n}.scale_weight", torch.tensor(1.0)).float()
            codes, wscales, wzeros = numerics.quantize_w4a16(w, scale_dtype=torch.bfloat16)
            out[f"{n}.weight"] = numerics.dequantize_w4a16(codes, wscales, wzeros).to(torch.bfloat16)
            out.pop(f"{n}.scale_weight", None)
        return out

    ids = torch.randint(0, config["vocab_size"], (2, 16), generator=gen)
    outputs, facts = {}, {}
    for tag, source in (("bf16", state), ("fp8", fp8)):
        quantized, missing, unexpected = build(NarrowT5W4A16Ops, source)
        reference, _, _ = build(comfy.ops.manual_cast, dequantized(source))
        original, _, _ = build(comfy.ops.manual_cast, state)
        with torch.no_grad():
            outputs[f"{tag}_quantized"] = quantized(ids, None)[0]
            outputs[f"{tag}_dequantized"] = reference(ids, None)[0]
            outputs[f"{tag}_original"] = original(ids, None)[0]
        facts[tag] = {"missing": missing, "layers": {n: type(m).__name__ for n, m in quantized.named_modules()
                                                     if n in linears},
                      "bytes": sum(b.numel() * b.element_size() for b in quantized.state_dict().values())}
    facts["dense_bytes"] = sum(t.numel() * t.element_size() for t in state.values())
    save_file({k: v.contiguous() for k, v in outputs.items()}, out, metadata={"facts": json.dumps(facts)})


if __name__ == "__main__":
    {"taesd": taesd, "load": load, "lora": lora, "fp8_sizing": fp8_sizing,
     "pending_inputs": pending_inputs, "t5": t5}[sys.argv[1]](*sys.argv[2:])
