"""Changes to a loaded FLUX model's modules that make it faster and compute the same."""

from __future__ import annotations

import weakref

import torch

from .. import linear, pending


def fuse_mlp_gelu(module: torch.nn.Module) -> int:
    """Moves the tanh-GELU of each double block's MLP ([linear, GELU, linear] in img_mlp and
    txt_mlp, in ComfyUI's FLUX model and `flux.model.Flux` alike) into its first layer when that
    is W4A4 (`SVDQLinear.gelu_from = 0`: on Hopper kernel 2's epilogue), putting nn.Identity in the
    GELU's place, so the MLP's wide hidden activations are written once instead of being read and
    written again by a separate GELU. Returns how many layers took one.

    The single blocks' GELU: fuse_single_block_concat.
    """
    fused = 0
    for block in module.modules():
        for name in ("img_mlp", "txt_mlp"):
            mlp = getattr(block, name, None)
            if (isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3 and isinstance(mlp[0], linear.SVDQLinear)
                    and mlp[0].gelu_from is None and isinstance(mlp[1], torch.nn.GELU)
                    and mlp[1].approximate == "tanh"):
                mlp[0].gelu_from, mlp[1] = 0, torch.nn.Identity()
                fused += 1
    return fused


class ConcatOperand(torch.nn.Module):
    """Stands where a single block's GELU was (its linear1 applies it now): passes linear1's GELU columns on as a
    pending piece of the concatenation that follows (pending.concat_operand), so that linear2's kernel 1 reads
    the attention output and those columns where they are; under torch.compile, and where no kernel 1 reads a
    concatenation, the columns themselves."""

    def forward(self, mlp: torch.Tensor) -> torch.Tensor:
        return pending.concat_operand(mlp)


def fuse_single_block_concat(module: torch.nn.Module) -> int:
    """Moves the tanh-GELU of each single block (linear1 = [qkv; mlp in], linear2 on cat(attention, GELU(mlp)),
    in ComfyUI's FLUX model and `flux.model.Flux` alike) into linear1 when both layers are W4A4
    (`gelu_from = 3 * hidden_size`: on the GPU kernel 2's epilogue), putting a ConcatOperand in the GELU's place,
    so that neither the GELU's output nor the concatenation is written (bench/NOTES.md#single-block-concat).
    Returns how many blocks took it."""
    fused = 0
    for block in module.modules():
        linear1, linear2 = getattr(block, "linear1", None), getattr(block, "linear2", None)
        act, hidden = getattr(block, "mlp_act", None), getattr(block, "hidden_size", None)
        if not (isinstance(linear1, linear.SVDQLinear) and isinstance(linear2, linear.SVDQLinear)
                and isinstance(act, torch.nn.GELU) and act.approximate == "tanh" and isinstance(hidden, int)
                and linear1.gelu_from is None):
            continue
        mlp = linear2.in_features - hidden  # ComfyUI's variants with a wider linear1 (yak_mlp) do not match
        if linear1.out_features == 3 * hidden + mlp and mlp > 0:
            linear1.gelu_from, block.mlp_act = 3 * hidden, ConcatOperand()
            fused += 1
    return fused


def fuse_gated_residuals(module: torch.nn.Module) -> int:
    """Marks the W4A4 layers whose output FLUX multiplies by a gate and adds into a residual stream (the double
    blocks' attention projections and MLP output layers, the single blocks' linear2, in ComfyUI's FLUX model and
    `flux.model.Flux` alike) `feeds_gated_residual`, so that kernel 2 writes residual + gate * y itself
    (bench/NOTES.md#gated-residual). Returns how many layers took it."""
    marked = 0
    for block in module.modules():
        outputs = [getattr(getattr(block, f"{stream}_attn", None), "proj", None) for stream in ("img", "txt")]
        outputs += [mlp[-1] for mlp in (getattr(block, "img_mlp", None), getattr(block, "txt_mlp", None))
                    if isinstance(mlp, torch.nn.Sequential) and len(mlp)]
        if hasattr(block, "linear1"):  # a single block
            outputs.append(getattr(block, "linear2", None))
        for layer in outputs:
            if isinstance(layer, linear.SVDQLinear) and not layer.feeds_gated_residual:
                layer.feeds_gated_residual = True
                marked += 1
    return marked


# (LayerNorm, the W4A4 layer it feeds through FLUX's modulation) attribute paths in ComfyUI's double and single blocks
_NORM_CONSUMERS = (("img_norm1", "img_attn.qkv"), ("img_norm2", "img_mlp.0"), ("txt_norm1", "txt_attn.qkv"),
                   ("txt_norm2", "txt_mlp.0"), ("pre_norm", "linear1"))


def mark_norm_consumers(module: torch.nn.Module) -> int:
    """Gives each LayerNorm module of ComfyUI's FLUX model that feeds a W4A4 layer (the double blocks' norm1 -> qkv
    and norm2 -> the MLP's first layer, the single blocks' pre_norm -> linear1) that layer as `prologue_consumer`
    (a weak reference: the layer belongs to its block), so that the LayerNorm stays pending only where the layer
    computes it in its kernel 1 (pending.stays_pending). Returns how many LayerNorms took one."""
    marked = 0
    for block in module.modules():
        for norm_name, layer_path in _NORM_CONSUMERS:
            norm, layer = getattr(block, norm_name, None), block
            for name in layer_path.split("."):
                layer = getattr(layer, name, None)
            if isinstance(norm, torch.nn.LayerNorm) and isinstance(layer, linear.SVDQLinear):
                norm.prologue_consumer = weakref.ref(layer)
                marked += 1
    return marked
