"""SVDQuant FLUX Loader: an SVDQuant FLUX file -> a ComfyUI MODEL built by ComfyUI's own FLUX code."""

import dataclasses
import functools

import torch

import comfy.ldm.flux.model
import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..svdquant import file_options, flux
from ..svdquant.format import FormatError
from .lora import apply_loras_on_load
from .ops import SVDQuantOps, sizing

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# activation quantization choices -> file_options.apply_file_options(pow2_activations=...)
ACTIVATION_SCALES = {"from file": None, "power-of-two": True, "exact": False}
# execution choices -> file_options.apply_file_options(fp8_execution=...)
EXECUTION = {"4-bit": False, "FP8 (H100/H200)": True}
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files ComfyUI lists in one of its model folders (only those are ever read)."""
    return [name for name in folder_paths.get_filename_list(folder) if name.lower().endswith(SAFETENSORS_SUFFIXES)]


def loadable_files() -> list[str]:
    """The safetensors files in diffusion_models that the loader reads (4-bit FLUX files)."""
    # a file removed since ComfyUI listed the folder has no path
    paths = {name: folder_paths.get_full_path("diffusion_models", name)
             for name in safetensors_files("diffusion_models")}
    return [name for name, path in paths.items() if path is not None and flux.files.file_problem(path) is None]


def device_options() -> list[str]:
    """'default' (ComfyUI's main device), 'cpu', and each CUDA device where there are several."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["default", "cpu"] + ([f"cuda:{i}" for i in range(count)] if count > 1 else [])


# FLUX.1's value for a FluxParams field that newer ComfyUI requires but that older detection or
# our files do not give (ComfyUI's own detection sets txt_ids_dims = [] for FLUX.1)
FLUX1_PARAMS = {"txt_ids_dims": []}


def flux_unet_config(path, tensors: dict, cfg: flux.arch.FluxConfig) -> dict:
    """ComfyUI's unet config for the file, as ComfyUI's own detection makes it from the key shapes.

    Detection reads only 16-bit tensors (embedders, norms) and counts blocks, so it works on a
    quantized file. The file's configuration (validated against its tensors) overrides what
    detection assumes (older ComfyUI takes every FLUX for full size). Fields the installed
    FluxParams requires that neither gives get FLUX.1's value, found by looking at its fields,
    so the pack follows ComfyUI's parameters without knowing its version.
    """
    detected = comfy.model_detection.detect_unet_config(tensors, "")
    if not detected or detected.get("image_model") != "flux":
        detected = {"image_model": "flux"}
    unet_config = {**detected, **cfg.to_dict()}
    params = dataclasses.fields(comfy.ldm.flux.model.FluxParams)
    for field in params:
        if field.name not in unet_config and field.name in FLUX1_PARAMS:
            unet_config[field.name] = FLUX1_PARAMS[field.name]
    missing = [field.name for field in params if field.name not in unet_config
               and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]
    if missing:
        raise FormatError(path, f"this ComfyUI's FLUX needs {', '.join(missing)}, which the pack cannot tell "
                                "for this file; please report it with your ComfyUI version")
    return unet_config


def model_patcher_class() -> type:
    """The patcher ComfyUI builds its own models with (CoreModelPatcher: DynamicVRAM where ComfyUI
    turned it on), or ModelPatcher where ComfyUI has no such choice."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def inference_dtype(base_model) -> torch.dtype:
    """The dtype ComfyUI runs the model's layers in (its manual cast dtype, else the weights')."""
    return base_model.manual_cast_dtype or base_model.get_dtype()


class CountsFP8Weights:
    """A ComfyUI patcher whose per-module sizes count the FP8 weights of the W4A4 layers in FP8 execution
    (nodes/ops.py SIZING): `_load_list` is where ComfyUI's patchers size each module
    (comfy.model_management.module_size) for a partial load or unload, so a layer whose 4-bit and FP8
    weights do not fit in the memory left stays in offload memory and runs from copies."""

    def _load_list(self, *args, **kwargs):
        with sizing(self.load_device, inference_dtype(self.model)):
            return super()._load_list(*args, **kwargs)


@functools.cache
def counting_patcher_class(base: type) -> type:
    """ComfyUI's patcher class `base` with CountsFP8Weights (one class per base, so clones keep it)."""
    return type(f"SVDQuant{base.__name__}", (CountsFP8Weights, base), {})


def quantized_model_patcher(base_model, load_device: torch.device, offload_device: torch.device):
    """ComfyUI's patcher for the model, sized as ComfyUI sizes a model (comfy.model_management.module_size)
    with the FP8 weights its W4A4 layers in FP8 execution will keep on load_device: the patcher's `size`
    argument, its creator's statement of the model's size, which its clones keep."""
    with sizing(load_device, inference_dtype(base_model)):
        size = comfy.model_management.module_size(base_model)
    return counting_patcher_class(model_patcher_class())(base_model, load_device=load_device,
                                                         offload_device=offload_device, size=size)


def load_svdquant_flux(path: str, dtype: torch.dtype, device: str = "default",
                       pow2_activations: bool | None = None, fp8_execution: bool = False
                       ) -> comfy.model_patcher.ModelPatcher:
    """Build ComfyUI's FLUX model with the file's layers as custom operations, in ComfyUI's patcher.

    The path is ComfyUI's own for a diffusion model (its detection, model config, state-dict
    conversion, patcher), with the configuration the file gives. The state dict is loaded
    strictly, so a file that does not fit ComfyUI's FLUX is an error naming the file, not a model
    with random layers.
    """
    model, cfg = flux.files.load_flux(path)
    unet_config = flux_unet_config(path, model.tensors, cfg)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, model.tensors)
    if model_config is None:
        raise FormatError(path, f"ComfyUI has no model class for this FLUX configuration {cfg.to_dict()}")
    if device == "cpu":
        load_device = offload_device = torch.device("cpu")
    else:
        load_device = comfy.model_management.get_torch_device() if device == "default" else torch.device(device)
        offload_device = comfy.model_management.unet_offload_device()
    model_config.set_inference_dtype(dtype, comfy.model_management.unet_manual_cast(
        dtype, load_device, model_config.supported_inference_dtypes))
    model_config.custom_operations = SVDQuantOps
    base_model = model_config.get_model(model.tensors, "")
    # ComfyUI's renames of older keys (e.g. the QK norms' .scale -> .weight), as its own loader does
    tensors = model_config.process_unet_state_dict(dict(model.tensors))
    try:
        base_model.diffusion_model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise FormatError(path, f"does not fit ComfyUI's FLUX model: {exc}") from None
    file_options.apply_file_options(base_model.diffusion_model, model.quantization, pow2_activations, fp8_execution)
    flux.fusion.fuse_mlp_gelu(base_model.diffusion_model)
    flux.fusion.fuse_single_block_concat(base_model.diffusion_model)
    flux.fusion.fuse_gated_residuals(base_model.diffusion_model)
    flux.fusion.mark_norm_consumers(base_model.diffusion_model)
    patcher = quantized_model_patcher(base_model, load_device, offload_device)
    apply_loras_on_load(patcher)  # ComfyUI's LoRA patches reach the 4-bit layers (nodes/lora.py)
    return patcher


class SVDQuantFluxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = loadable_files()
        return io.Schema(
            node_id="SVDQuantFluxLoader",
            display_name="SVDQuant FLUX Loader",
            category="SVDQuant",
            description="Loads a 4-bit SVDQuant FLUX.1 transformer (schnell or dev, told apart from the file) "
                        "for ComfyUI's samplers. Text encoders and VAE load with the usual loaders.",
            inputs=[
                io.Combo.Input("model_name", options=files,
                               tooltip="An SVDQuant FLUX.1 file in models/diffusion_models: made by this pack, "
                                       "or a nunchaku single-file INT4 model "
                                       "(svdq-int4_r32-flux.1-*.safetensors)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="bfloat16",
                               tooltip="16-bit type of activations and of the unquantized layers. bfloat16 suits "
                                       "FLUX; float16 is for GPUs without bfloat16 (before Ampere)."),
                io.Combo.Input("device", options=device_options(), default="default",
                               tooltip="Where the model runs: ComfyUI's main device (default), the CPU (slow, "
                                       "PyTorch reference path), or a particular GPU. ComfyUI still offloads it "
                                       "to system memory when it needs room."),
                io.Combo.Input("activation_scales", options=list(ACTIVATION_SCALES), default="from file",
                               optional=True,  # prompts saved before this input still validate
                               tooltip="How the 4-bit layers quantize their inputs. 'from file': power-of-two "
                                       "scales where the file has power-of-two weight scales, exact "
                                       "elsewhere. 'power-of-two': faster on H100/H200 for any model, nunchaku "
                                       "files included, with a slightly larger quantization error. "
                                       "'exact': nunchaku's scales everywhere."),
                io.Combo.Input("execution", options=list(EXECUTION), default="4-bit", optional=True,
                               tooltip="'FP8 (H100/H200)': the 4-bit layers run on FP8 tensor cores, each layer's "
                                       "weights and low-rank branch merged into 8-bit weights when it is loaded onto the GPU: "
                                       "faster than the exact 4-bit kernels (nunchaku files) and closer to the "
                                       "16-bit model, for 1 more byte per weight of GPU memory (FLUX.1: +8 GiB), "
                                       "which ComfyUI counts when it decides what fits on the GPU (layers left in system memory "
                                       "run in 4 bits); use it where the whole model fits (FLUX.1: 14.3 GiB), "
                                       "4-bit elsewhere: on less it is 2-3x slower than 4-bit. Other GPUs, "
                                       "float16 and the CPU run the 4-bit layers."),
            ],
            outputs=[io.Model.Output(tooltip="The quantized FLUX model, for KSampler and the other model nodes.")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str) -> bool | str:
        """Before the prompt runs (ComfyUI calls this in place of its own list check): a file that is
        missing, or that the loader cannot read, named with the reason."""
        path = folder_paths.get_full_path("diffusion_models", model_name)
        problem = ("not found in models/diffusion_models: put the 4-bit FLUX file there (made by the SVDQuant "
                   "FLUX Quantizer, or svdq-int4_r32-flux.1-*.safetensors from nunchaku-tech on Hugging Face) and "
                   "refresh the node definitions (R)") if path is None else flux.files.file_problem(path)
        return True if problem is None else f"{model_name}: {problem}"

    @classmethod
    def execute(cls, model_name: str, dtype: str, device: str, activation_scales: str = "from file",
                execution: str = "4-bit") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        return io.NodeOutput(load_svdquant_flux(path, DTYPES[dtype], device, ACTIVATION_SCALES[activation_scales],
                                                EXECUTION[execution]))
