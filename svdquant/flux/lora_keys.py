"""Reading LoRA files for FLUX: every common key format normalised to ComfyUI/BFL FLUX module names.

`load_lora` and `convert_lora` normalise a LoRA file into per-module deltas (`lora.LoraDelta`) keyed
by ComfyUI/BFL FLUX module names (`double_blocks.0.img_attn.qkv`, `single_blocks.3.linear1`, ...):

  Kohya            lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / .lora_up.weight / .alpha
  Kohya, diffusers lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight (OneTrainer),
  names            lycoris_... (SimpleTuner)
  diffusers / PEFT transformer.transformer_blocks.0.attn.to_q.lora_A.weight / .lora_B.weight
  XLabs            double_blocks.0.processor.qkv_lora1.down.weight / .up.weight
  ComfyUI / BFL    diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (or .lora_down/.lora_up)

A LoRA on part of a fused layer (diffusers' separate q/k/v for `img_attn.qkv`; q/k/v and
proj_mlp for `single_blocks.i.linear1`) is placed in that part's rows of the fused layer.

Only safetensors files are read: never pickle.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import format as file_format
from ..lora import Lora, LoraDelta, LoraError

log = logging.getLogger("svdquant")


@dataclass(frozen=True)
class _Target:
    """Where a LoRA module name lands: a FLUX module, optionally a block of its rows.

    rows = (first, count, total) in units of the layer's input width H (the hidden size): to_k
    of a fused [q; k; v] layer is (1, 1, 3). swap_halves: the LoRA's output halves come in the
    other order (diffusers' norm_out.linear is [scale; shift], ComfyUI's final layer [shift; scale]).
    """

    module: str
    rows: tuple[int, int, int] | None = None
    swap_halves: bool = False


# In-block module names of every format -> ComfyUI/BFL in-block module. FLUX.1's single-block
# linear1 is [q; k; v; mlp_in] with mlp_in 4 H wide, so 7 H rows in all.
_DOUBLE_BLOCK = {
    # ComfyUI / BFL / Kohya
    **{name: _Target(name) for name in (
        "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
        "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin")},
    # diffusers
    "attn.to_q": _Target("img_attn.qkv", (0, 1, 3)),
    "attn.to_k": _Target("img_attn.qkv", (1, 1, 3)),
    "attn.to_v": _Target("img_attn.qkv", (2, 1, 3)),
    "attn.add_q_proj": _Target("txt_attn.qkv", (0, 1, 3)),
    "attn.add_k_proj": _Target("txt_attn.qkv", (1, 1, 3)),
    "attn.add_v_proj": _Target("txt_attn.qkv", (2, 1, 3)),
    "attn.to_out.0": _Target("img_attn.proj"),
    "attn.to_add_out": _Target("txt_attn.proj"),
    "ff.net.0.proj": _Target("img_mlp.0"),
    "ff.net.2": _Target("img_mlp.2"),
    "ff_context.net.0.proj": _Target("txt_mlp.0"),
    "ff_context.net.2": _Target("txt_mlp.2"),
    "norm1.linear": _Target("img_mod.lin"),
    "norm1_context.linear": _Target("txt_mod.lin"),
    # XLabs attention processors
    "processor.qkv_lora1": _Target("img_attn.qkv"),
    "processor.proj_lora1": _Target("img_attn.proj"),
    "processor.qkv_lora2": _Target("txt_attn.qkv"),
    "processor.proj_lora2": _Target("txt_attn.proj"),
}
_SINGLE_BLOCK = {
    **{name: _Target(name) for name in ("linear1", "linear2", "modulation.lin")},
    "linear1_qkv": _Target("linear1", (0, 3, 7)),  # ComfyUI's name for linear1's attention rows
    "attn.to_q": _Target("linear1", (0, 1, 7)),
    "attn.to_k": _Target("linear1", (1, 1, 7)),
    "attn.to_v": _Target("linear1", (2, 1, 7)),
    "proj_mlp": _Target("linear1", (3, 4, 7)),
    "proj_out": _Target("linear2"),  # diffusers' proj_out reads [attn | mlp], as linear2 does
    "norm.linear": _Target("modulation.lin"),
    "processor.qkv_lora": _Target("linear1", (0, 3, 7)),
    "processor.proj_lora": _Target("linear2"),
}
_TOP_LEVEL = {
    **{name: _Target(name) for name in (
        "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
        "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
        "final_layer.adaLN_modulation.1")},
    "x_embedder": _Target("img_in"),
    "context_embedder": _Target("txt_in"),
    "time_text_embed.timestep_embedder.linear_1": _Target("time_in.in_layer"),
    "time_text_embed.timestep_embedder.linear_2": _Target("time_in.out_layer"),
    "time_text_embed.text_embedder.linear_1": _Target("vector_in.in_layer"),
    "time_text_embed.text_embedder.linear_2": _Target("vector_in.out_layer"),
    "time_text_embed.guidance_embedder.linear_1": _Target("guidance_in.in_layer"),
    "time_text_embed.guidance_embedder.linear_2": _Target("guidance_in.out_layer"),
    "proj_out": _Target("final_layer.linear"),
    "norm_out.linear": _Target("final_layer.adaLN_modulation.1", swap_halves=True),
}


def _underscored(table: dict[str, _Target]) -> dict[str, _Target]:
    # Kohya-style names replace every '.' by '_'; dotted names are looked up the same way.
    return {name.replace(".", "_"): target for name, target in table.items()}


_BLOCKS = {  # block prefix of any format -> (ComfyUI/BFL block prefix, in-block table)
    "double_blocks": ("double_blocks", _underscored(_DOUBLE_BLOCK)),
    "transformer_blocks": ("double_blocks", _underscored(_DOUBLE_BLOCK)),
    "single_blocks": ("single_blocks", _underscored(_SINGLE_BLOCK)),
    "single_transformer_blocks": ("single_blocks", _underscored(_SINGLE_BLOCK)),
}
_TOP_LEVEL_UNDERSCORED = _underscored(_TOP_LEVEL)
_BLOCK_NAME = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)_(\d+)_(.+)$")

# Module name prefixes of the formats, longest first so that none hides another.
_MODULE_PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "transformer.",
                    "lora_transformer_", "lora_unet_", "lycoris_")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "lora_prior_te")

# Key suffixes naming a LoRA factor, longest first (".lora.down.weight" also ends in ".down.weight").
# Not SD-era diffusers' "to_q_lora.down.weight": no FLUX trainer writes it, and it would read XLabs'
# "processor.qkv_lora.down.weight" as module "processor.qkv".
_ROLE_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),  # XLabs: processor.qkv_lora1.down.weight
    (".alpha", "alpha"),
)
# Key parts of adapters that are not a plain low-rank pair; they cannot join the low-rank branch.
_UNSUPPORTED = ((".lokr_", "LoKr"), (".hada_", "LoHa"), (".dora_scale", "DoRA"), (".lora_magnitude_vector", "DoRA"))


def _split_key(key: str) -> tuple[str, str] | None:
    """'<module>.lora_down.weight' -> ('<module>', 'down'); None for a key that is no LoRA factor."""
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    return None


def _resolve(module_key: str) -> _Target | None:
    """A LoRA file's module name (any format) -> its FLUX target, None if it names no FLUX layer."""
    name = module_key
    for prefix in _MODULE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = name.replace(".", "_")
    match = _BLOCK_NAME.match(name)
    if match is None:
        return _TOP_LEVEL_UNDERSCORED.get(name)
    block, index, inner = match.groups()
    flux_block, table = _BLOCKS[block]
    target = table.get(inner)
    if target is None:
        return None
    return _Target(f"{flux_block}.{index}.{target.module}", target.rows, target.swap_halves)


def _place(delta: LoraDelta, target: _Target, name: str) -> LoraDelta:
    """Put a part's delta where it acts in the FLUX module (rows of a fused layer, swapped halves)."""
    if target.swap_halves:
        half = delta.up.shape[0] // 2
        return LoraDelta(delta.down, torch.cat((delta.up[half:], delta.up[:half])), delta.source)
    if target.rows is None:
        return delta
    first, count, total = target.rows
    hidden = delta.down.shape[0]  # every part of a fused FLUX layer reads the hidden state
    if delta.up.shape[0] != count * hidden:
        raise LoraError(delta.source, f"{name}: {delta.up.shape[0]} output rows, expected {count} x {hidden} "
                                      f"for this part of {target.module}")
    return delta.placed_in_rows(first * hidden, total * hidden)


def _combine(parts: list[LoraDelta], module: str) -> LoraDelta:
    """One delta for a module from its parts: parts with an identical down matrix share columns
    (their up matrices, zero outside their own rows, add up), the others sit side by side."""
    shapes = {(p.down.shape[0], p.up.shape[0]) for p in parts}
    if len(shapes) > 1:
        raise LoraError(parts[0].source, f"{module}: its LoRA parts disagree on the layer's shape "
                                         f"((in, out) = {sorted(shapes)})")
    groups: list[LoraDelta] = []
    for part in parts:
        for i, group in enumerate(groups):
            if group.down.shape == part.down.shape and torch.equal(group.down, part.down):
                groups[i] = LoraDelta(group.down, group.up + part.up, group.source)
                break
        else:
            groups.append(part)
    if len(groups) == 1:
        return groups[0]
    return LoraDelta(torch.cat([g.down for g in groups], dim=1), torch.cat([g.up for g in groups], dim=1),
                     parts[0].source)


def convert_lora(tensors: dict[str, torch.Tensor], source: str) -> Lora:
    """Normalise a LoRA state dict (any supported format) into per-module deltas.

    source: the file's name, for messages. Keys that name no FLUX layer are reported in one
    warning; LoKr, LoHa and DoRA weights, unpaired factors, and a LoRA with no FLUX layer at all
    raise LoraError.
    """
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched: list[str] = []
    text_encoder = 0
    for key, tensor in tensors.items():
        for marker, kind in _UNSUPPORTED:
            if marker in key:
                raise LoraError(source, f"{kind} weights are not supported, only plain LoRA (low-rank pairs) "
                                        f"can join the quantized layers (key {key})")
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            text_encoder += 1
            continue
        split = _split_key(key)
        if split is None:
            unmatched.append(key)
            continue
        module_key, role = split
        factors.setdefault(module_key, {})[role] = (key, tensor)

    parts: dict[str, list[LoraDelta]] = {}
    for module_key, roles in factors.items():
        target = _resolve(module_key)
        if target is None:
            unmatched.extend(key for key, _ in roles.values())
            continue
        if "down" not in roles or "up" not in roles:
            present = ", ".join(key for key, _ in roles.values())
            raise LoraError(source, f"{module_key}: has {present} but not both a down and an up matrix")
        alpha = None
        if "alpha" in roles:
            alpha_key, alpha_tensor = roles["alpha"]
            if alpha_tensor.numel() != 1:
                raise LoraError(source, f"{alpha_key}: an alpha of shape {tuple(alpha_tensor.shape)}, "
                                        "expected one number")
            alpha = float(alpha_tensor.float().item())
        delta = LoraDelta.from_pair(roles["down"][1], roles["up"][1], alpha, source, module_key)
        parts.setdefault(target.module, []).append(_place(delta, target, module_key))

    if not parts:
        shown = ", ".join(sorted(tensors)[:5])
        raise LoraError(source, f"no key names a FLUX layer, so it changes nothing (keys: {shown}"
                                f"{', ...' if len(tensors) > 5 else ''})")
    if text_encoder:
        log.info("%s: %d text-encoder keys left to the text encoder's LoRA loader", source, text_encoder)
    if unmatched:
        log.warning("%s: %d keys match no FLUX layer and are ignored: %s", source, len(unmatched),
                    ", ".join(sorted(unmatched)))
    return Lora(source, {module: _combine(module_parts, module) for module, module_parts in parts.items()})


def load_lora(path) -> Lora:
    """Read and normalise a LoRA file (safetensors only; FP8-stored weights are upcast)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraError(path, "only .safetensors LoRA files are read (pickle-based files are never loaded)")
    file_format.read_header(path)  # a clear error for a missing file or a broken header
    return convert_lora(file_format.load_tensors(path), path.name)
