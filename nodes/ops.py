"""ComfyUI custom operations for SVDQuant models (`model_options["custom_operations"]`).

ComfyUI builds its own FLUX model with these operations, then loads the state dict into it. A
Linear here allocates nothing when built: the file decides what each layer holds. Dense layers
then behave exactly as ComfyUI's own `manual_cast` layers (casting, LoRA weight patches,
low-VRAM offload); quantized layers keep their 4-bit tensors as buffers (so ComfyUI's memory
management counts their real size and moves them with the model) and run the engine's kernels.
"""

import torch

import comfy.ops

from ..svdquant import linear


class SVDQuantOps(comfy.ops.manual_cast):
    class Linear(comfy.ops.manual_cast.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            torch.nn.Module.__init__(self)  # torch.nn.Linear.__init__ would allocate a dense weight
            self.in_features, self.out_features = in_features, out_features
            self.has_bias, self.dtype = bias, dtype
            self.kind = None
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

        def reset_parameters(self):
            return None

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            linear.load_any_kind(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs)

        def extra_repr(self):
            return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"

        def forward(self, x):
            if self.kind == linear.DENSE:
                return super().forward(x)
            return linear.quantized_forward(self, x)
