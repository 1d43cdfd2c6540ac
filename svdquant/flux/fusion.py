"""Changes to a loaded FLUX model's modules that make it faster and compute the same."""

from __future__ import annotations

import torch

from .. import linear


def fuse_mlp_gelu(module: torch.nn.Module) -> int:
    """Moves the tanh-GELU of each double block's MLP ([linear, GELU, linear] in img_mlp and
    txt_mlp, in ComfyUI's FLUX model and `flux.model.Flux` alike) into its first layer when that
    is W4A4 (`SVDQLinear.gelu_from = 0`: on Hopper kernel 2's epilogue), putting nn.Identity in the
    GELU's place, so the MLP's wide hidden activations are written once instead of being read and
    written again by a separate GELU. Returns how many layers took one.

    The single blocks keep their GELU: it reads a strided slice of linear1's output, and its
    contiguous result makes the concatenation that follows cheaper by about what the separate GELU
    costs, so fusing it there measured no faster end to end (bench/NOTES.md#v22).
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
