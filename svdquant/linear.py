"""Quantized linear modules: SVDQLinear (W4A4 + 16-bit low-rank), W4A16Linear, and LoadedLinear.

All hold their weights 4-bit (packed uint8) in memory on every device and keep the natural
file layout as their state dict, so `load_state_dict` from a file made by `format.save_model`
just works. Modules are built before their tensors are known (ComfyUI builds the model first,
then loads the state dict), so the rank and whether an input shift exists are taken from the
state dict at load time; shapes are checked against in/out features.

LoadedLinear goes one step further and takes its kind (dense, W4A4 or W4A16) from the state dict:
which layers of a model are quantized is a property of the file, and model code (ours and
ComfyUI's) builds every linear layer the same way. The load and forward functions below are
shared with the ComfyUI custom operation in nodes/ops.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from . import kernels, numerics

GROUP_SIZE = numerics.GROUP_SIZE
DENSE, W4A4, W4A16 = "dense", "w4a4", "w4a16"
# every field name a linear layer of any kind can have in a state dict
LAYER_FIELDS = ("weight", "bias", "qweight", "wscales", "wzeros", "smooth", "smooth_orig",
                "lora_down", "lora_up", "shift")


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def stored_kind(state: dict, prefix: str = "") -> str:
    """What the state dict stores for the linear layer at `prefix`: DENSE, W4A4 or W4A16."""
    if prefix + "qweight" not in state:
        return DENSE
    return W4A16 if prefix + "wzeros" in state else W4A4


def expected_shapes(kind: str, in_features: int, out_features: int, state: dict, bias: bool | None,
                    rank: int = 0) -> dict[str, tuple[int, ...] | None]:
    """Field -> required shape for a layer of `kind` (None: the field must be absent).

    state: the layer's entries present in the state dict (field -> tensor), which decide the
    optional fields (rank, shift, smooth_orig). bias: whether the layer must have a bias
    (True), must not (False), or may have one (None).
    """
    k, n, g = in_features, out_features, in_features // GROUP_SIZE
    if kind == DENSE:
        shapes = {"weight": (n, k)}
    elif kind == W4A4:
        if "lora_down" in state and state["lora_down"].dim() == 2:
            rank = state["lora_down"].shape[1]
        shapes = {"qweight": (n, k // 2), "wscales": (g, n), "smooth": (k,), "lora_down": (k, rank),
                  "lora_up": (n, rank)}
        shapes.update({name: (k,) if name in state else None for name in ("shift", "smooth_orig")})
    elif kind == W4A16:
        shapes = {"qweight": (n, k // 2), "wscales": (g, n), "wzeros": (g, n)}
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if bias is None:
        bias = "bias" in state
    shapes["bias"] = (n,) if bias else None
    return shapes


def _remove_tensor(module: nn.Module, name: str) -> None:
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    module.__dict__.pop(name, None)


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor | None, parameter: bool) -> None:
    """Put `tensor` on the module as a parameter or a buffer, replacing whatever held the name."""
    _remove_tensor(module, name)
    if parameter:
        module._parameters[name] = None if tensor is None else nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[name] = tensor


def load_layer(module: nn.Module, kind: str, shapes: dict, state_dict: dict, prefix: str, strict: bool,
               missing_keys: list, unexpected_keys: list, error_msgs: list, dtype: torch.dtype | None = None) -> None:
    """A linear layer's `_load_from_state_dict`: check each field against `shapes`, then store it.

    Dense weights become parameters (so weight patching and casting code finds them), quantized
    tensors buffers. Float tensors are converted to `dtype` when given; everything keeps the
    device the module's existing tensor has (or the state dict's when the module has none yet).
    Nothing is stored unless every field is present with its shape.
    """
    accepted = {}
    for name, shape in shapes.items():
        key = prefix + name
        tensor = state_dict.get(key)
        if tensor is None:
            if shape is not None:
                missing_keys.append(key)
        elif shape is None:
            unexpected_keys.append(key)
        elif tuple(tensor.shape) != tuple(shape):
            error_msgs.append(f"{key}: shape {tuple(tensor.shape)} does not match {tuple(shape)} for a "
                              f"{module.out_features}x{module.in_features} {kind} layer")
        else:
            accepted[name] = tensor
    if strict:
        for key in state_dict:
            if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in shapes:
                unexpected_keys.append(key)
    if len(accepted) < sum(shape is not None for shape in shapes.values()):
        return
    for name in LAYER_FIELDS:  # a module that held another kind before drops that kind's tensors
        if name in ("weight", "bias") and name not in shapes:
            _set_tensor(module, name, None, parameter=True)  # None, as in a torch Linear without it
        elif name not in shapes:
            _remove_tensor(module, name)
    for name, shape in shapes.items():
        tensor = accepted.get(name)
        if tensor is not None:
            current = getattr(module, name, None)
            device = current.device if isinstance(current, torch.Tensor) else tensor.device
            target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            tensor = tensor.detach().to(device=device, dtype=target)
        _set_tensor(module, name, tensor, parameter=kind == DENSE)
    module.kind = kind
    module.unsigned_groups = (numerics.unsigned_groups_from_shift(module.shift, module.in_features)
                              if kind == W4A4 else None)


def on_device(layer, device: torch.device) -> SimpleNamespace:
    """The layer's tensors copied to `device`, for one call."""
    view = SimpleNamespace(kind=layer.kind, in_features=layer.in_features, out_features=layer.out_features,
                           unsigned_groups=layer.unsigned_groups)
    for name in LAYER_FIELDS:
        tensor = getattr(layer, name, None)
        setattr(view, name, None if tensor is None else tensor.to(device, non_blocking=True))
    return view


def quantized_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """Forward of a W4A4 or W4A16 layer on x [..., K] (any batch shape).

    A layer whose tensors are not on x's device (ComfyUI's low-VRAM mode leaves some layers in
    offload memory) runs on copies made for this call.
    """
    if layer.qweight.device != x.device:
        layer = on_device(layer, x.device)
    lead = x.shape[:-1]
    flat = x.reshape(-1, layer.in_features)
    y = kernels.svdq_linear(flat, layer) if layer.kind == W4A4 else kernels.w4a16_linear(flat, layer)
    return y.reshape(*lead, layer.out_features)


class _QuantizedLinearBase(nn.Module):
    """Shared shape bookkeeping for layers of a fixed kind, whose buffers are resized at load."""

    kind: str

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        if in_features % GROUP_SIZE:
            raise ValueError(f"in_features {in_features} is not a multiple of {GROUP_SIZE}")
        self.in_features = in_features
        self.out_features = out_features

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        present = {name: state_dict[prefix + name] for name in LAYER_FIELDS if prefix + name in state_dict}
        has_bias = True if self.bias is not None else None
        shapes = expected_shapes(self.kind, self.in_features, self.out_features, present, has_bias,
                                 rank=getattr(self, "rank", 0))
        if getattr(self, "shift", None) is not None:  # built with a shift: the state dict must have one
            shapes["shift"] = (self.in_features,)
        load_layer(self, self.kind, shapes, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SVDQLinear(_QuantizedLinearBase):
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ lora_down) @ lora_up^T + bias.

    Buffers (natural layout): qweight uint8 [N, K/2] (signed INT4 pairs), wscales [K/64, N],
    smooth [K], lora_down [K, r], lora_up [N, r], bias [N] (optional), shift [K] (optional:
    groups with a positive shift are quantized unsigned), smooth_orig [K] (optional, unused by
    the forward; see `format`).
    """

    kind = W4A4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 0,
                 shift: bool = False, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features)
        k, n, g = in_features, out_features, in_features // GROUP_SIZE
        self.register_buffer("qweight", _empty((n, k // 2), torch.uint8, device))
        self.register_buffer("wscales", _empty((g, n), dtype, device))
        self.register_buffer("smooth", torch.ones(k, dtype=dtype, device=device))
        self.register_buffer("lora_down", torch.zeros((k, rank), dtype=dtype, device=device))
        self.register_buffer("lora_up", torch.zeros((n, rank), dtype=dtype, device=device))
        self.register_buffer("bias", _empty((n,), dtype, device) if bias else None)
        self.register_buffer("shift", torch.zeros(k, dtype=dtype, device=device) if shift else None)
        self.unsigned_groups = numerics.unsigned_groups_from_shift(self.shift, k)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SVDQLinear":
        n, half_k = tensors["qweight"].shape
        layer = cls(half_k * 2, n, bias="bias" in tensors, rank=tensors["lora_down"].shape[1],
                    shift="shift" in tensors, device=tensors["qweight"].device, dtype=tensors["wscales"].dtype)
        layer.load_state_dict(tensors)
        return layer


class W4A16Linear(_QuantizedLinearBase):
    """y = x @ W^T + bias with W[n, k] = code[n, k] * wscales[g, n] + wzeros[g, n] (g = k // 64).

    Buffers: qweight uint8 [N, K/2] (unsigned INT4 pairs), wscales and wzeros [K/64, N], bias [N].
    """

    kind = W4A16

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features)
        k, n, g = in_features, out_features, in_features // GROUP_SIZE
        self.register_buffer("qweight", _empty((n, k // 2), torch.uint8, device))
        self.register_buffer("wscales", _empty((g, n), dtype, device))
        self.register_buffer("wzeros", _empty((g, n), dtype, device))
        self.register_buffer("bias", _empty((n,), dtype, device) if bias else None)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "W4A16Linear":
        n, half_k = tensors["qweight"].shape
        layer = cls(half_k * 2, n, bias="bias" in tensors, device=tensors["qweight"].device,
                    dtype=tensors["wscales"].dtype)
        layer.load_state_dict(tensors)
        return layer


def load_any_kind(module: nn.Module, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """`_load_from_state_dict` of a layer whose kind is what the state dict stores (LoadedLinear
    and the ComfyUI custom operation). The module has in_features, out_features, has_bias (what
    the model architecture says) and dtype (None keeps the file's float dtypes)."""
    kind = stored_kind(state_dict, prefix)
    if kind != DENSE and module.in_features % GROUP_SIZE:
        error_msgs.append(f"{prefix[:-1]}: a quantized layer needs an input width that is a multiple of "
                          f"{GROUP_SIZE}, not {module.in_features}")
        return
    present = {name: state_dict[prefix + name] for name in LAYER_FIELDS if prefix + name in state_dict}
    # a quantized layer may carry a bias the original lacked (the shift correction of post-GELU inputs)
    bias = module.has_bias if kind == DENSE or module.has_bias else None
    shapes = expected_shapes(kind, module.in_features, module.out_features, present, bias)
    load_layer(module, kind, shapes, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs,
               dtype=module.dtype)


class LoadedLinear(nn.Module):
    """A linear layer that is dense, W4A4 or W4A16, as its state dict says.

    Nothing is allocated before the state dict is loaded; a forward before that is an error.
    Float tensors are converted to `dtype` at load when one is given.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.has_bias, self.dtype = bias, dtype
        self.kind = None
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        load_any_kind(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            raise RuntimeError(f"{type(self).__name__} used before its state dict was loaded")
        if self.kind == DENSE:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)
        return quantized_forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
