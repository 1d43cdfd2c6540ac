"""SVDQuant FLUX Text Encoders: CLIP-L and T5-XXL files -> a ComfyUI CLIP whose T5 holds 4-bit weights."""

import torch

import comfy.sd
import folder_paths
from comfy_api.latest import io

from ..svdquant import format as fmt
from ..svdquant import linear
from .loader import safetensors_files
from .ops import T5W4A16Ops


def load_flux_text_encoders(clip_l_path: str, t5_path: str, device: str = "default") -> comfy.sd.CLIP:
    """ComfyUI's FLUX text encoders (its own loading code and classes), built with T5W4A16Ops so that
    the T5-XXL's linear layers load as 4-bit weights. Fails, naming the file, where nothing in the T5
    slot loaded as 4-bit layers (not a T5-XXL file), and for files that are not readable safetensors."""
    for path in (clip_l_path, t5_path):
        fmt.read_header(path)
    model_options = {"custom_operations": T5W4A16Ops}
    if device == "cpu":
        model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
    clip = comfy.sd.load_clip(ckpt_paths=[clip_l_path, t5_path],
                              embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=comfy.sd.CLIPType.FLUX, model_options=model_options)
    if not any(isinstance(m, linear.W4A16Linear) for m in clip.cond_stage_model.modules()):
        raise ValueError(f"{t5_path}: no T5-XXL layers were loaded from this file; pick a t5xxl file "
                         "(bf16, fp16 or fp8) for t5_name and the CLIP-L file for clip_name")
    return clip


class SVDQuantFluxTextEncoders(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = safetensors_files("text_encoders")
        return io.Schema(
            node_id="SVDQuantFluxTextEncoders",
            display_name="SVDQuant FLUX Text Encoders (4-bit T5)",
            category="SVDQuant",
            description="Loads FLUX's two text encoders like DualCLIPLoader (type flux), with the T5-XXL's "
                        "linear layers quantized to 4-bit weights as they load (W4A16, per 64-weight group): "
                        "about 2.9 GB for the T5-XXL instead of 9.5 GB in bf16 or 4.9 GB in fp8. CLIP-L stays "
                        "16-bit. LoRAs apply to CLIP-L only.",
            inputs=[
                io.Combo.Input("clip_name", options=files,
                               tooltip="The CLIP-L file in models/text_encoders (clip_l.safetensors). Kept as it is."),
                io.Combo.Input("t5_name", options=files,
                               tooltip="The T5-XXL file in models/text_encoders: bf16, fp16 or fp8, scaled fp8 "
                                       "included (t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors). Its "
                                       "linear layers are quantized as they load; a file on disk is not written."),
                io.Combo.Input("device", options=["default", "cpu"], default="default",
                               tooltip="Where the text encoders run: ComfyUI's choice (default) or the CPU."),
            ],
            outputs=[io.Clip.Output(tooltip="FLUX's text encoders, for CLIP Text Encode (Prompt).")],
        )

    @classmethod
    def execute(cls, clip_name: str, t5_name: str, device: str = "default") -> io.NodeOutput:
        clip_l = folder_paths.get_full_path_or_raise("text_encoders", clip_name)
        t5 = folder_paths.get_full_path_or_raise("text_encoders", t5_name)
        return io.NodeOutput(load_flux_text_encoders(clip_l, t5, device))
