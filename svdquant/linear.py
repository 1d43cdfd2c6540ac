"""Quantized linear modules: SVDQLinear (W4A4 + 16-bit low-rank) and W4A16Linear.

Both hold their weights 4-bit (packed uint8) in memory on every device and keep the natural
file layout as their state dict, so `load_state_dict` from a file made by `format.save_model`
just works. Modules are built before their tensors are known (ComfyUI builds the model first,
then loads the state dict), so the rank and whether an input shift exists are taken from the
state dict at load time; shapes are checked against in/out features.
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels, numerics

GROUP_SIZE = numerics.GROUP_SIZE


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


class _QuantizedLinearBase(nn.Module):
    """Shared shape bookkeeping: buffers whose shape is checked and may be resized at load."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        if in_features % GROUP_SIZE:
            raise ValueError(f"in_features {in_features} is not a multiple of {GROUP_SIZE}")
        self.in_features = in_features
        self.out_features = out_features

    def _expected_shapes(self, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        present = {name: state_dict[prefix + name] for name in self._buffers if prefix + name in state_dict}
        expected = self._expected_shapes(present)
        for name, shape in expected.items():
            tensor = present.get(name)
            if tensor is None:
                if shape is not None:
                    missing_keys.append(prefix + name)
                continue
            if shape is None:
                unexpected_keys.append(prefix + name)
            elif tuple(tensor.shape) != tuple(shape):
                error_msgs.append(
                    f"{prefix}{name}: shape {tuple(tensor.shape)} does not match {tuple(shape)} "
                    f"for a {self.out_features}x{self.in_features} layer")
            else:
                current = self._buffers.get(name)
                device = current.device if current is not None else tensor.device
                self._buffers[name] = tensor.detach().to(device)
        if strict:
            own = set(self._buffers)
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in own:
                    unexpected_keys.append(key)
        self._after_load()

    def _after_load(self) -> None:
        pass

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SVDQLinear(_QuantizedLinearBase):
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ lora_down) @ lora_up^T + bias.

    Buffers (natural layout): qweight uint8 [N, K/2] (signed INT4 pairs), wscales [K/64, N],
    smooth [K], lora_down [K, r], lora_up [N, r], bias [N] (optional), shift [K] (optional:
    groups with a positive shift are quantized unsigned).

    LoRAs (`svdquant.lora`) are concatenated onto lora_down / lora_up after the model's own
    `base_rank` columns, which are never modified, so removing them is a slice of those columns.
    """

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
        self._after_load()

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]

    def _expected_shapes(self, state):
        k, n = self.in_features, self.out_features
        rank = state["lora_down"].shape[1] if "lora_down" in state and state["lora_down"].dim() == 2 else self.rank
        has_bias = "bias" in state or self.bias is not None
        return {
            "qweight": (n, k // 2), "wscales": (k // GROUP_SIZE, n), "smooth": (k,),
            "lora_down": (k, rank), "lora_up": (n, rank),
            "bias": (n,) if has_bias else None,
            # the shift is optional whatever the module was built with
            "shift": (k,) if "shift" in state else (None if self.shift is None else (k,)),
        }

    def _after_load(self) -> None:
        # per-group signed/unsigned mode follows the shift; computed once, on the CPU
        self.unsigned_groups = numerics.unsigned_groups_from_shift(self.shift, self.in_features)
        # freshly loaded tensors carry no LoRA: all of their rank is the model's own branch
        self.base_rank = self.rank

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SVDQLinear":
        n, half_k = tensors["qweight"].shape
        layer = cls(half_k * 2, n, bias="bias" in tensors, rank=tensors["lora_down"].shape[1],
                    shift="shift" in tensors, device=tensors["qweight"].device, dtype=tensors["wscales"].dtype)
        layer.load_state_dict(tensors)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = kernels.svdq_linear(x.reshape(-1, self.in_features), self)
        return y.reshape(*lead, self.out_features)


class W4A16Linear(_QuantizedLinearBase):
    """y = x @ W^T + bias with W[n, k] = code[n, k] * wscales[g, n] + wzeros[g, n] (g = k // 64).

    Buffers: qweight uint8 [N, K/2] (unsigned INT4 pairs), wscales and wzeros [K/64, N], bias [N].

    LoRAs (`svdquant.lora`) run as a 16-bit low-rank side branch, y += (x @ lora_down) @ lora_up^T,
    rather than being merged into W: merging would need a 16-bit copy of W or a lossy
    requantization that could not be undone exactly. The branch is not part of the state dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features)
        k, n, g = in_features, out_features, in_features // GROUP_SIZE
        self.register_buffer("qweight", _empty((n, k // 2), torch.uint8, device))
        self.register_buffer("wscales", _empty((g, n), dtype, device))
        self.register_buffer("wzeros", _empty((g, n), dtype, device))
        self.register_buffer("bias", _empty((n,), dtype, device) if bias else None)
        self.register_buffer("lora_down", None, persistent=False)  # [K, r] while LoRAs are set
        self.register_buffer("lora_up", None, persistent=False)  # [N, r]

    def _expected_shapes(self, state):
        k, n, g = self.in_features, self.out_features, self.in_features // GROUP_SIZE
        has_bias = "bias" in state or self.bias is not None
        return {"qweight": (n, k // 2), "wscales": (g, n), "wzeros": (g, n), "bias": (n,) if has_bias else None}

    def _after_load(self) -> None:
        # freshly loaded tensors carry no LoRA
        self.lora_down = self.lora_up = None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "W4A16Linear":
        n, half_k = tensors["qweight"].shape
        layer = cls(half_k * 2, n, bias="bias" in tensors, device=tensors["qweight"].device,
                    dtype=tensors["wscales"].dtype)
        layer.load_state_dict(tensors)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        y = kernels.w4a16_linear(x2d, self)
        if self.lora_down is not None:
            y = (y.float() + numerics.lowrank_reference(x2d, self.lora_down, self.lora_up)).to(y.dtype)
        return y.reshape(*lead, self.out_features)
