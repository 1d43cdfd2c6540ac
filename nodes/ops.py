"""ComfyUI custom operations for SVDQuant models (`model_options["custom_operations"]`).

ComfyUI builds its own FLUX model with these operations, then loads the state dict into it. A
Linear here allocates nothing when built; when its tensors arrive it becomes, in place, what the
file stores for it (`svdquant.linear.become_stored_kind`): ComfyUI's own `manual_cast.Linear`
for 16-bit layers (so casting, LoRA weight patches and low-VRAM offload work as for any model),
or an engine SVDQLinear / W4A16Linear whose 4-bit tensors are buffers, so ComfyUI's memory
management counts their real size and moves them with the model (in FP8 execution, with the FP8
weights a layer keeps where it runs: `SIZING`). Those get an empty `weight` buffer for ComfyUI's
LoRA keys (see `add_lora_key` and nodes/lora.py).
"""

import contextlib
import contextvars

import torch

import comfy.model_management
import comfy.ops

from ..svdquant import linear, pending, quantize

# ComfyUI sizes a model and each of its modules by their state dicts (comfy.model_management.module_size),
# and a W4A4 layer in FP8 execution keeps FP8 weights beside its 4-bit ones where it runs. While a patcher
# sizes modules for a load (nodes/loader.py), SIZING holds the load device and the inputs' dtype, and such a
# layer's state dict also holds an empty meta tensor (FP8_WEIGHTS_KEY) of its FP8 weights' size, so that the
# partial-load decisions count them; a state dict taken at any other time (saving, LoRA keys) does not.
SIZING: contextvars.ContextVar[tuple[torch.device, torch.dtype] | None] = contextvars.ContextVar(
    "svdquant_sizing", default=None)
FP8_WEIGHTS_KEY = "fp8_weights"
# what later ComfyUI builds run at the top of each of their operations (0.33.0: the check for an interrupted
# prompt); a LayerNorm of ours that leaves its output pending runs it too
RUN_EVERY_OP = getattr(comfy.ops, "run_every_op", None)


@contextlib.contextmanager
def sizing(device: torch.device, dtype: torch.dtype):
    """Within the block, state dicts of W4A4 layers count the FP8 weights they keep on `device` with `dtype`
    inputs."""
    token = SIZING.set((device, dtype))
    try:
        yield
    finally:
        SIZING.reset(token)


def add_lora_key(layer: torch.nn.Module) -> None:
    """Give a quantized layer the `weight` key ComfyUI's LoRA loading needs, as an empty buffer.

    ComfyUI maps LoRA names to `<layer>.weight` entries of the model's state dict
    (comfy.lora.model_lora_keys_unet builds the Kohya and BFL names from them) and drops patches for
    keys not in it (ModelPatcher.add_patches). A quantized layer has no dense weight, so it carries
    an empty persistent buffer of that name. ComfyUI's weight patching only writes parameters, so it
    never touches this buffer; nodes/lora.py applies the patches to the low-rank branch.
    """
    layer.register_buffer("weight", torch.empty(0, dtype=layer.wscales.dtype, device=layer.qweight.device))


class PlaceholderLinear(comfy.ops.manual_cast.Linear):
    """A linear layer that allocates nothing when built; its _load_from_state_dict decides what it
    becomes (linear.become_stored_kind). Used before that, it is an error."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        torch.nn.Module.__init__(self)  # torch.nn.Linear.__init__ would allocate a dense weight
        self.in_features, self.out_features = in_features, out_features
        self.has_bias, self.device, self.dtype = bias, device, dtype
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def reset_parameters(self):
        return None

    def forward(self, x):
        raise RuntimeError("an SVDQuant layer was used before its state dict was loaded")


class SVDQuantOps(comfy.ops.manual_cast):
    # comfy_cast_weights and the weight/bias function lists are what ComfyUI's model patcher
    # looks for on a layer it may leave in offload memory in low-VRAM mode
    class SVDQLinear(linear.SVDQLinear, comfy.ops.CastWeightBiasOp):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            add_lora_key(self)

        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            sized_for = SIZING.get()
            fp8_bytes = 0 if sized_for is None else self.fp8_weights_bytes(*sized_for)
            if fp8_bytes:
                destination[prefix + FP8_WEIGHTS_KEY] = torch.empty(fp8_bytes, dtype=torch.uint8, device="meta")

    class W4A16Linear(linear.W4A16Linear, comfy.ops.CastWeightBiasOp):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            add_lora_key(self)

    class LayerNorm(comfy.ops.manual_cast.LayerNorm):
        """ComfyUI's LayerNorm, whose output stays pending (svdquant.pending, docs/DESIGN.md#producer-quantization)
        where the 4-bit layer it feeds (`prologue_consumer`, given by the loader: flux.fusion.mark_norm_consumers)
        computes it in its kernel: no affine parameters, so nothing for ComfyUI to cast, and no weight or bias
        functions added by ComfyUI's patches; an input pending.stays_pending accepts."""

        prologue_consumer = None  # weakref.ref of the W4A4 layer fed, or None

        def forward(self, *args, **kwargs):
            consumer = self.prologue_consumer() if self.prologue_consumer is not None else None
            if (len(args) == 1 and not kwargs and self.weight is None and self.bias is None
                    and not self.weight_function and not self.bias_function
                    and pending.stays_pending(args[0], self.normalized_shape, consumer)):
                if RUN_EVERY_OP is not None:
                    RUN_EVERY_OP()
                return pending.pending_layer_norm(args[0], self.eps)
            return super().forward(*args, **kwargs)

    class Linear(PlaceholderLinear):
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            classes = {linear.DENSE: comfy.ops.manual_cast.Linear, linear.W4A4: SVDQuantOps.SVDQLinear,
                       linear.W4A16: SVDQuantOps.W4A16Linear}
            linear.become_stored_kind(self, classes, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class T5W4A16Ops(comfy.ops.manual_cast):
    """Text-encoder operations that load the T5-XXL's linear layers as 4-bit weights (W4A16).

    ComfyUI builds the text encoders (CLIP-L and T5-XXL share one `model_options`) with these
    operations, then loads their state dicts. A Linear here allocates nothing when built; when its
    dense weight arrives it becomes, in place, an engine W4A16Linear holding the weight quantized
    per 64-group (`quantize.quantize_weight_w4a16`) if the layer is a T5-XXL one (a side of 4096 or
    more: CLIP-L's linears are at most 3072 wide), else ComfyUI's own manual_cast.Linear. Weights
    may come in any float dtype, fp8 with a `scale_weight` included. The quantized layers have no
    dense `weight` key, so LoRAs that target the T5 do not load into it (ComfyUI says which keys);
    LoRAs for CLIP-L do.
    """

    class W4A16Linear(linear.W4A16Linear, comfy.ops.CastWeightBiasOp):
        pass

    class Linear(PlaceholderLinear):
        min_features = 4096  # a T5-XXL linear (4096 / 10240 wide)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            weight = state_dict.get(prefix + "weight")
            if (weight is None or weight.dim() != 2 or self.in_features % linear.GROUP_SIZE
                    or max(self.in_features, self.out_features) < self.min_features):
                linear.become_stored_kind(self, {linear.DENSE: comfy.ops.manual_cast.Linear}, state_dict, prefix,
                                          local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
                return
            # on ComfyUI's main device (the GPU where there is one): ~0.5 s per 10240 x 4096 layer on
            # two CPU cores, a minute for the whole T5-XXL
            work = comfy.model_management.get_torch_device()
            dense = weight.to(work).float()
            if prefix + "scale_weight" in state_dict:  # ComfyUI's scaled fp8 files
                dense = dense * state_dict[prefix + "scale_weight"].to(work).float()
            # the layer's dtype, unless that is an 8-bit one (fp8 files): scales and zeros need 16 bits
            if self.dtype not in (torch.bfloat16, torch.float16):
                self.dtype = torch.bfloat16
            tensors = quantize.quantize_weight_w4a16(dense, state_dict.get(prefix + "bias"), self.dtype)
            linear.become_stored_kind(self, {linear.W4A16: T5W4A16Ops.W4A16Linear},
                                      {prefix + name: t for name, t in tensors.items()}, prefix, local_metadata,
                                      strict, missing_keys, unexpected_keys, error_msgs)
