"""LoRAs on SVDQuant FLUX in ComfyUI: ComfyUI's own LoRA patches reach the 4-bit layers, and the
SVDQuant LoRA Stack node.

How a LoRA gets to a quantized layer. ComfyUI's LoRA loaders (LoraLoader, LoraLoaderModelOnly, and
this pack's LoRA Stack) only add patches to a clone of the ModelPatcher, keyed `<layer>.weight`;
the quantized layers carry an empty `weight` buffer so that those keys exist (nodes/ops.py). When
ComfyUI loads the model for sampling, it patches the 16-bit layers' weights itself, and at the end of
every load (full, partial or low-VRAM) it calls the ON_LOAD callback registered here, which turns
the patches of each quantized layer into low-rank deltas and makes them the layer's whole LoRA list
(`svdquant.lora.set_layer_loras`: concatenated onto the low-rank branch). The list is rebuilt from
the layer's own tensors on every load, so a clone with other strengths replaces, never adds to,
what the previous clone applied. ComfyUI restores the model for good in detach(unpatch_all=True),
whose ON_DETACH callback clears the lists; detach(unpatch_all=False), used when another clone of
the same model is about to load, leaves them as ComfyUI leaves its own patched weights.

Why callbacks and not a ModelPatcher subclass: ComfyUI builds its LoRA key map from the base
model's state dict before any patcher is involved, so the `weight` keys are needed either way; as
buffers they are never handed to patch_weight_to_device (ComfyUI patches parameters only), and the
low-VRAM path attaches LowVramPatch functions instead, so the one point every load passes through
is ON_LOAD. Callbacks are ComfyUI's extension API and are copied by clone().
"""

from __future__ import annotations

import functools
import logging
import os

import torch

import comfy.model_patcher
import comfy.patcher_extension
import folder_paths
from comfy.weight_adapter import LoRAAdapter
from comfy_api.latest import io

from ..svdquant import linear
from ..svdquant.flux.arch import V_ROWS_READ_BY
from ..svdquant.flux.lora_keys import load_lora
from ..svdquant.lora import Lora, LoraDelta, LoraError, set_layer_loras

log = logging.getLogger("svdquant")

CALLBACK_KEY = "svdquant_lora"
# what a delta made from ComfyUI's patches names as its source in error messages (ComfyUI's
# patches do not record the file they came from)
PATCH_SOURCE = "LoRA patches"
NO_LORA = "None"
STACK_SLOTS = 4


class UnsupportedPatchError(ValueError):
    """A patch on a quantized layer that cannot join its low-rank branch; names the layer."""


def quantized_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Name -> module of the model's 4-bit layers (ComfyUI's names, "diffusion_model." included)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (linear.SVDQLinear, linear.W4A16Linear))}


# ComfyUI's adapter names (comfy.weight_adapter) as their authors spell them
ADAPTER_NAMES = {"loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "oft": "OFT", "boft": "BOFT"}


def _describe(patch) -> str:
    if isinstance(patch, list):
        return "a merged model's weights"
    if isinstance(patch, tuple):
        return f"a '{patch[0] if len(patch) == 2 else 'diff'}' weight patch"
    name = getattr(patch, "name", type(patch).__name__)
    return f"a {ADAPTER_NAMES.get(name, name)} patch"


def deltas_from_patches(layer_name: str, layer: torch.nn.Module, patches) -> list[tuple[LoraDelta, float]]:
    """ComfyUI's patches of `<layer>.weight` [(strength, adapter, strength_model, offset, function)]
    as (delta, strength) pairs for `set_layer_loras`. Plain LoRA only (LoRAAdapter without DoRA,
    LoCon mid or reshape); an offset places the delta in rows of a fused layer (diffusers' q/k/v)."""
    pairs = []
    for strength, patch, strength_model, offset, function in patches:
        problem = None
        if not isinstance(patch, LoRAAdapter):
            problem = _describe(patch)
        else:
            up, down, alpha, mid, dora_scale, reshape = patch.weights
            if dora_scale is not None:
                problem = "a DoRA patch"
            elif mid is not None or reshape is not None:
                problem = "a LoRA patch with a mid weight or a reshape (convolution LoRA)"
            elif strength_model != 1.0 or function is not None:
                problem = "a patch that rescales or transforms the whole weight"
            elif offset is not None and (offset[0] != 0 or offset[2] != up.shape[0]):
                problem = f"a LoRA patch on a slice {tuple(offset)} other than whole output rows"
        if problem is not None:
            raise UnsupportedPatchError(
                f"{layer_name}: {problem} cannot be applied to this 4-bit layer; only plain LoRA (low-rank "
                "pairs) joins an SVDQuant layer's low-rank branch")
        delta = LoraDelta.from_pair(down, up, alpha, PATCH_SOURCE, layer_name)
        if offset is not None:
            delta = delta.placed_in_rows(offset[1], layer.out_features)
        pairs.append((delta, strength))
    return pairs


def apply_patches_to_quantized_layers(patcher: comfy.model_patcher.ModelPatcher, *load_args) -> None:
    """ON_LOAD: make each quantized layer's LoRA list what the patcher's patches say (none: none)."""
    layers = quantized_layers(patcher.model)
    for key in patcher.patches:
        name, _, field = key.rpartition(".")
        if name in layers and field != "weight":
            raise UnsupportedPatchError(f"{name}: a patch of its {field} cannot be applied to this 4-bit layer; "
                                        "only LoRA weight patches (low-rank pairs) apply to SVDQuant layers")
    set_layer_loras(layers, {name: deltas_from_patches(name, layer, patcher.patches.get(f"{name}.weight", ()))
                             for name, layer in layers.items()}, v_rows_read_by=V_ROWS_READ_BY)


def clear_quantized_loras(patcher: comfy.model_patcher.ModelPatcher, unpatch_all: bool) -> None:
    """ON_DETACH: ComfyUI restored its own weights (unpatch_all), so the LoRA lists go too."""
    if unpatch_all:
        set_layer_loras(quantized_layers(patcher.model), {}, v_rows_read_by=V_ROWS_READ_BY)


def apply_loras_on_load(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Register the callbacks on a freshly built SVDQuant model's patcher (its clones inherit them)."""
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, CALLBACK_KEY,
                                  apply_patches_to_quantized_layers)
    patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, CALLBACK_KEY,
                                  clear_quantized_loras)


@functools.lru_cache(maxsize=STACK_SLOTS)
def _read_lora(path: str, mtime_ns: int, size: int) -> Lora:
    # keyed by modification time and size too, so an edited file is read again; a changed
    # strength alone re-runs the node without reading the files again
    return load_lora(path)


def lora_patches(lora: Lora) -> dict[str, LoRAAdapter]:
    """A normalised LoRA as ComfyUI patches: one plain LoRA pair per FLUX module, alpha already
    folded in, fused parts already placed in their rows, so no offsets or functions."""
    return {f"diffusion_model.{module}.weight": LoRAAdapter(set(), (delta.up, delta.down.t(), None, None, None, None))
            for module, delta in lora.deltas.items()}


class SVDQuantLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = [NO_LORA] + [name for name in folder_paths.get_filename_list("loras")
                             if name.lower().endswith(".safetensors")]
        inputs = [io.Model.Input("model", tooltip="The FLUX model the LoRAs are added to, with or without "
                                                  "LoRAs from other loaders.")]
        for slot in range(1, STACK_SLOTS + 1):
            inputs += [
                io.Combo.Input(f"lora_{slot}", options=files, default=NO_LORA,
                               tooltip="A FLUX LoRA in models/loras: Kohya, diffusers/PEFT, XLabs or ComfyUI/BFL "
                                       "keys, FP8 or 16-bit. None skips the slot."),
                io.Float.Input(f"strength_{slot}", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly this LoRA changes the model; negative values invert it, "
                                       "0 skips it."),
            ]
        return io.Schema(
            node_id="SVDQuantLoraStack",
            display_name="SVDQuant LoRA Stack",
            category="SVDQuant",
            description="Adds up to four LoRAs to the model, in order, on top of any LoRAs already added "
                        "(LoraLoader nodes before or after it stack the same way). On SVDQuant layers a LoRA "
                        "joins the 16-bit low-rank branch, so nothing is requantized; strengths can change "
                        "between runs without reloading the model.",
            inputs=inputs,
            outputs=[io.Model.Output(tooltip="The model with the LoRAs added.")],
        )

    @classmethod
    def execute(cls, model, **slots) -> io.NodeOutput:
        patched = model.clone()
        for slot in range(1, STACK_SLOTS + 1):
            name, strength = slots[f"lora_{slot}"], slots[f"strength_{slot}"]
            if name == NO_LORA or strength == 0:
                continue
            path = folder_paths.get_full_path_or_raise("loras", name)
            stat = os.stat(path)
            lora = _read_lora(path, stat.st_mtime_ns, stat.st_size)
            patches = lora_patches(lora)
            added = set(patched.add_patches(patches, strength))
            missing = sorted(key[len("diffusion_model."):-len(".weight")] for key in patches if key not in added)
            if len(missing) == len(patches):
                raise LoraError(lora.source, "none of its layers is in this model")
            if missing:
                log.warning("%s: %d layers are not in this model and are skipped: %s", lora.source, len(missing),
                            ", ".join(missing))
        return io.NodeOutput(patched)
