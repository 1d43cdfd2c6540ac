"""SVDQuant FLUX Quantizer: a 16-bit FLUX.1 file in diffusion_models -> an SVDQuant file beside it
that the SVDQuant FLUX Loader reads (the engine's flux.quantizer.quantize_checkpoint)."""

import logging
import os
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..svdquant import flux, kernels, quantize
from ..svdquant.format import FormatError
from .loader import safetensors_files

log = logging.getLogger("svdquant")
SUFFIX = ".safetensors"


def default_output_name(model_name: str, rank: int, pow2_scales: bool) -> str:
    """svdq-int4_r32-<input stem>, nunchaku's naming; -pow2 marks power-of-two scales so that both
    formats of one model can sit side by side."""
    return f"svdq-int4_r{rank}{'-pow2' if pow2_scales else ''}-{Path(model_name).stem}"


def output_folder() -> str:
    """Where quantized files go: models/diffusion_models (ComfyUI lists the legacy models/unet first,
    but diffusion_models is where the loader's files are expected), else the first folder."""
    folders = folder_paths.get_folder_paths("diffusion_models")
    return next((folder for folder in folders if os.path.basename(os.path.normpath(folder)) == "diffusion_models"),
                folders[0])


def prompts_from_conditioning(conditioning: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ComfyUI CONDITIONING ([[context [B, L, C], {"pooled_output": [B, P], ...}], ...]) as the
    engine's calibration prompts: one (context, pooled) pair per entry and batch row."""
    prompts = []
    for context, extra in conditioning:
        pooled = extra.get("pooled_output")
        if pooled is None:
            raise ValueError("calibration_prompts: a conditioning without the pooled CLIP-L output; encode the "
                             "prompts with FLUX text encoders (DualCLIPLoader type flux, or SVDQuant FLUX Text "
                             "Encoders) and CLIP Text Encode")
        prompts += [(context[i].cpu(), pooled[min(i, pooled.shape[0] - 1)].cpu()) for i in range(context.shape[0])]
    return prompts


def quantizable_files() -> list[str]:
    """The files in diffusion_models the quantizer can read: 16-bit FLUX.1 transformers, decided from
    each file's header (remembered per file modification time and size)."""
    return [name for name in safetensors_files("diffusion_models")
            if flux.quantizer.is_quantizable_checkpoint(folder_paths.get_full_path("diffusion_models", name))]


def result_text(result: flux.quantizer.QuantizedCheckpoint) -> str:
    """What the node shows when done: the written file, its size, and the quality report's mean and
    worst layers."""
    worst = "\n".join(f"  {name}: {err:.4f}" for name, err in result.quality["worst"])
    return (f"{result.path.name}: {len(result.layers)} quantized layers, {result.path.stat().st_size / 2**30:.2f} GiB\n"
            f"held-out relative output error of the 4-bit layers: mean {result.quality['mean']:.4f}; worst:\n{worst}\n"
            f"every layer's: {flux.quantizer.quality_report_path(result.path).name}")


class SVDQuantFluxQuantizer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = quantizable_files()
        return io.Schema(
            node_id="SVDQuantFluxQuantizer",
            display_name="SVDQuant FLUX Quantizer",
            category="SVDQuant",
            description="Quantizes a 16-bit FLUX.1 transformer (schnell or dev) to SVDQuant 4-bit and saves it in "
                        "models/diffusion_models for the SVDQuant FLUX Loader, one block at a time on ComfyUI's "
                        "main device (full-size FLUX.1: about 3 GiB of system and 5 GiB of GPU memory). Calibrates "
                        "on the prompts connected to calibration_prompts, else on random stand-in inputs, and shows "
                        "each 4-bit layer's output error on held-out calls (mean and worst layers).",
            inputs=[
                io.Combo.Input("model_name", options=files,
                               tooltip="A 16-bit (bf16, fp16 or fp32) FLUX.1 transformer in models/diffusion_models, "
                                       "with BFL/ComfyUI key names (flux1-dev.safetensors, flux1-schnell.safetensors)."),
                io.String.Input("output_name", default="",
                                tooltip="Name of the quantized file, without .safetensors; empty: "
                                        "svdq-int4_r<rank>-<model name> (-pow2 added for power-of-two scales). "
                                        "An existing file is never overwritten."),
                io.Int.Input("rank", default=32, min=flux.quantizer.MIN_MODEL_RANK,
                             max=flux.quantizer.MAX_MODEL_RANK, step=kernels.RANK_MULTIPLE,
                             tooltip="Rank of the 16-bit low-rank branch that absorbs outliers. 32 is what the "
                                     "published SVDQuant models use; higher is slightly more accurate, larger and "
                                     "slower."),
                io.Boolean.Input("pow2_scales", default=False,
                                 tooltip="Power-of-two scales: power-of-two weight scales (and power-of-two "
                                         "activation scales when loaded), which H100/H200 compute "
                                         "faster, at a slightly larger quantization error. The file loads wherever "
                                         "other SVDQuant files do."),
                io.Int.Input("calibration_calls", default=4, min=1, max=16,
                             tooltip="Model calls whose layer inputs set the smoothing of each 4-bit layer, on the "
                                     "calibration prompts (call i takes prompt i modulo their count) or on random "
                                     "stand-in inputs. More calls record more tokens (at most 1024 per layer), at "
                                     "more calibration time."),
                io.Boolean.Input("learned_smoothing", default=False,
                                 tooltip="Also learn each 4-bit layer's smoothing on its calibration inputs "
                                         "(100 optimizer steps per layer): a smaller quantization error (-5% per "
                                         "layer on a real transformer's weights) for about 2.8x the quantization "
                                         "time (FLUX.1-dev on an H100: about 9 instead of 4 minutes)."),
                io.Combo.Input("rotation", options=list(quantize.ROTATIONS), default=quantize.DEFAULT_ROTATION,
                               optional=True,
                               tooltip="Rotate each 4-bit layer's inputs inside every group of 64 channels before "
                                       "quantizing them. hadamard: -6% layer error on a real transformer's "
                                       "weights at no extra time. learned: the rotation learned per layer "
                                       "(slower to quantize and to run; with learned_smoothing the lowest "
                                       "error). Both need this pack's format version 2; none: a file older "
                                       "versions of the pack load."),
                io.Conditioning.Input("calibration_prompts", optional=True,
                                      tooltip="Optional: prompts like the ones you will generate, encoded by the "
                                              "FLUX text encoders (CLIP Text Encode; several joined with "
                                              "Conditioning (Combine); each batch row counts as a prompt). "
                                              "Calibrating on real text embeddings instead of random stand-ins "
                                              "matches what the text-stream layers see; each call runs at 64x64 "
                                              "latents."),
            ],
            outputs=[io.String.Output(display_name="file_name",
                                      tooltip="The written file's name in diffusion_models, for the loader.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model_name: str, output_name: str, rank: int, pow2_scales: bool,
                calibration_calls: int, learned_smoothing: bool = False, calibration_prompts=None,
                rotation: str = quantize.DEFAULT_ROTATION) -> io.NodeOutput:
        source = folder_paths.get_full_path_or_raise("diffusion_models", model_name)
        name = output_name.strip().removesuffix(SUFFIX) or default_output_name(model_name, rank, pow2_scales)
        if name.startswith(".") or any(sep in name for sep in ("/", "\\")):
            raise ValueError(f"output_name {output_name!r}: a plain file name is needed, not a path")
        target = Path(output_folder()) / f"{name}{SUFFIX}"
        if target.exists():
            raise FormatError(target, "already exists; choose another output_name (files are never overwritten)")

        cfg = flux.quantizer.checkpoint_config(source)  # also fails early on a file that is no 16-bit FLUX.1
        bar = comfy.utils.ProgressBar(sum(spec.kind != flux.arch.DENSE
                                          for spec in flux.arch.linear_layers(cfg).values()))

        def layer_done(layer: str) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel stops between layers
            bar.update(1)

        prompts = None if calibration_prompts is None else prompts_from_conditioning(calibration_prompts)
        result = flux.quantizer.quantize_checkpoint(source, target, rank=rank, pow2_scales=pow2_scales,
                                                    calibration_calls=calibration_calls, prompts=prompts,
                                                    learned_smoothing=learned_smoothing, rotation=rotation,
                                                    device=comfy.model_management.get_torch_device(),
                                                    on_layer=layer_done, report=log.info)
        message = result_text(result)
        log.info("wrote %s", message)
        return io.NodeOutput(target.name, ui=ui.PreviewText(message))
