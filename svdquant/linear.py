"""Quantized linear modules: SVDQLinear (W4A4 + 16-bit low-rank), W4A16Linear, and LoadedLinear.

All hold their weights 4-bit (packed uint8) in memory on every device and keep the natural
file layout as their state dict, so `load_state_dict` from a file made by `format.save_model`
just works. Modules are built before their tensors are known (ComfyUI builds the model first,
then loads the state dict), so the rank and whether an input shift exists are taken from the
state dict at load time; shapes are checked against in/out features.

LoadedLinear goes one step further: model code (ours and ComfyUI's) builds every linear layer the
same way, without its name, while which layers are quantized is a property of the file. So a
LoadedLinear allocates nothing and, when its state dict arrives, becomes in place the layer the
stored tensors call for: an SVDQLinear, a W4A16Linear or a dense linear. Code that looks at the
loaded model (ComfyUI's memory management, LoRA application) sees those classes. The ComfyUI
custom operation (nodes/ops.py) does the same with ComfyUI's layer classes.
"""

from __future__ import annotations

import functools
import itertools
import re
import weakref

import torch
from torch import nn

from . import format as fmt
from . import kernels, numerics, pending
from .families import fp8

GROUP_SIZE = numerics.GROUP_SIZE
DENSE, W4A4, W4A16 = "dense", "w4a4", "w4a16"
# every tensor a quantized layer can hold (the file's fields of both kinds; a W4A16 layer's LoRA side
# branch uses the W4A4 names lora_down / lora_up)
QUANTIZED_FIELDS = tuple(dict.fromkeys(fmt.LAYER_FIELDS[W4A4] + fmt.LAYER_FIELDS[W4A16]))


def _empty(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device)


def stored_kind(state: dict, prefix: str = "") -> str:
    """What the state dict stores for the linear layer at `prefix`: DENSE, W4A4 or W4A16."""
    if prefix + "qweight" not in state:
        return DENSE
    return W4A16 if prefix + "wzeros" in state else W4A4


def expected_shapes(kind: str, in_features: int, out_features: int, state: dict, bias: bool | None,
                    rank: int = 0) -> dict[str, tuple[int, ...] | None]:
    """Field -> required shape for a quantized layer of `kind` (None: the field must be absent).

    state: the layer's entries present in the state dict (field -> tensor), which decide the
    optional fields (rank, shift, smooth_orig, rotation). bias: whether the layer must have a bias
    (True), must not (False), or may have one (None). The shapes are the file format's.
    """
    if kind == W4A4 and "lora_down" in state and state["lora_down"].dim() == 2:
        rank = state["lora_down"].shape[1]
    desc = {"kind": kind, "in": in_features, "out": out_features, "rank": rank,
            "bias": "bias" in state if bias is None else bias,
            "shift": "shift" in state, "smooth_orig": "smooth_orig" in state,
            "rotation": state["rotation"].shape[0] if "rotation" in state and state["rotation"].dim() == 3 else 0}
    required = {name: shape for name, (shape, _) in fmt.expected_layer_tensors(desc).items()}
    return {**{name: None for name in fmt.LAYER_FIELDS[kind]}, **required}


def _copied(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def quantized_forward(layer, x: torch.Tensor, residual: kernels.GatedResidual | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Forward of a W4A4 or W4A16 layer on x [..., K] (any batch shape); with a residual ([M, N] and its gate, M the
    tokens of x) residual + gate * y instead, written into out [M, N] where given (the residual's tensor: in place).

    A layer whose tensors are not on x's device (ComfyUI's low-VRAM mode leaves some layers in
    offload memory) runs on copies made for this call. x may be a pending tensor (pending.Pending: a LayerNorm
    output, a concatenation): a W4A4 layer whose tensors are on its device hands what it stands for to its kernel
    (docs/DESIGN.md#producer-quantization); any other case computes x first.
    """
    if isinstance(x, pending.Pending):
        waiting = x.kernel_input() if layer.kind == W4A4 else None
        # the sources' metadata, not the wrapper's (each query of the wrapper's runs its __torch_function__)
        if waiting is not None and layer.qweight.device == waiting[0].device:
            operand, norm, lead = waiting
            y = layer.w4a4_kernel()(operand, norm=norm, residual=residual, out=out)
            return y.reshape(*lead, layer.out_features)
        x = x.value()
    lead = x.shape[:-1]
    flat = x.reshape(-1, layer.in_features)
    here = layer.qweight.device == x.device
    if layer.kind == W4A4:
        kernel = layer.w4a4_kernel() if here else layer.w4a4_kernel(x.device)
        return kernel(flat, residual=residual, out=out).reshape(*lead, layer.out_features)
    else:
        tensors = [layer.qweight, layer.wscales, layer.wzeros, layer.bias, layer.lora_down, layer.lora_up]
        if not here:
            tensors = [_copied(t, x.device) for t in tensors]
        qweight, wscales, wzeros, bias, lora_down, lora_up = tensors
        y = kernels.w4a16_linear(flat, qweight, wscales, wzeros, bias)
        if lora_down is not None:  # LoRAs on a W4A16 layer: a 16-bit low-rank side branch
            y = (y.float() + numerics.lowrank_reference(flat, lora_down, lora_up)).to(y.dtype)
        if residual is not None:
            y = residual.apply(y, out)
    return y.reshape(*lead, layer.out_features)


# Under torch.compile (ComfyUI's TorchCompileModel node compiles the whole diffusion model) a quantized
# layer is one opaque operator, quantized_linear(x, layer handle, out_features): dynamo must not trace
# into the kernels (driver launches, derived tensors keyed on data pointers), and an operator, unlike a
# skipped function, does not break the graph, so the model stays one graph (no resumption and guard checks
# after each layer; bench/NOTES.md#compile-operator). out_features gives the output's shape without running it.
# The operator finds the layer by its handle in _LAYERS. The namespace follows the module's import
# name: the pack imported as a ComfyUI custom node and as `svdquant` in one process has two operators.
_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count()
OPERATOR = "svdquant_" + re.sub(r"[^0-9A-Za-z_]", "_", __name__) + "::quantized_linear"


def _quantized_linear(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return quantized_forward(_LAYERS[layer], x)


def _quantized_linear_shape(x: torch.Tensor, layer: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


if not hasattr(torch.library, "custom_op"):
    raise ImportError(f"the pack needs torch 2.4 or newer (this is torch {torch.__version__})")
_operator = torch.library.custom_op(OPERATOR, _quantized_linear, mutates_args=(),
                                    schema="(Tensor x, int layer, int out_features) -> Tensor")
_operator.register_fake(_quantized_linear_shape)


def _register(layer: nn.Module) -> None:
    """Give the layer its own handle in the operator's table (a new one for a copy)."""
    layer.handle = next(_HANDLES)
    _LAYERS[layer.handle] = layer


class _QuantizedLinearBase(nn.Module):
    """Shared shape bookkeeping: buffers whose shape is checked and may be resized at load.

    Float tensors are converted at load to the dtype the layer was built with (a rotation stays float32).

    feeds_gated_residual (set by `flux.fusion.fuse_gated_residuals`): the forward returns a pending.PendingOutput
    where it may (`pending.defers_output`), so that FLUX's `residual + gate * y` runs in the layer's kernel 2.
    """

    kind: str
    feeds_gated_residual: bool = False

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        if in_features % GROUP_SIZE:
            raise ValueError(f"in_features {in_features} is not a multiple of {GROUP_SIZE}")
        self.in_features = in_features
        self.out_features = out_features
        _register(self)

    def __setstate__(self, state):  # copy.deepcopy and pickle: the copy is a layer of its own
        super().__setstate__(state)
        _register(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        present = {name: state_dict[prefix + name] for name in QUANTIZED_FIELDS if prefix + name in state_dict}
        own_rank = self.lora_down.shape[1] if self.kind == W4A4 else 0
        shapes = expected_shapes(self.kind, self.in_features, self.out_features, present,
                                 True if self.bias is not None else None, rank=own_rank)
        if getattr(self, "shift", None) is not None:  # built with a shift: the state dict must have one
            shapes["shift"] = (self.in_features,)
        accepted = {}
        for name, shape in shapes.items():
            key, tensor = prefix + name, present.get(name)
            if tensor is None:
                if shape is not None:
                    missing_keys.append(key)
            elif shape is None:
                unexpected_keys.append(key)
            elif tuple(tensor.shape) != tuple(shape):
                error_msgs.append(f"{key}: shape {tuple(tensor.shape)} does not match {tuple(shape)} for a "
                                  f"{self.out_features}x{self.in_features} {self.kind} layer")
            else:
                accepted[name] = tensor
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in shapes:
                    unexpected_keys.append(key)
        if len(accepted) < sum(shape is not None for shape in shapes.values()):
            return
        dtype, device = self.wscales.dtype, self.qweight.device
        for name in shapes:
            tensor = accepted.get(name)
            if tensor is not None:
                # the rotation's coefficients stay float32 (format.expected_layer_tensors)
                wanted = torch.float32 if name == "rotation" else dtype if tensor.is_floating_point() else None
                tensor = tensor.detach().to(device=device, dtype=wanted)
            self._buffers[name] = tensor
        self._after_load()

    def _after_load(self) -> None:
        """Recompute what derives from the loaded tensors (subclasses: activation modes, LoRA state)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return _operator(x, self.handle, self.out_features)
        if self.feeds_gated_residual and pending.defers_output(x):
            return pending.PendingOutput(functools.partial(quantized_forward, self, x), x,
                                         (*x.shape[:-1], self.out_features))
        return quantized_forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SVDQLinear(_QuantizedLinearBase):
    """y = Q((x + shift) / smooth) . Q(R)^T + (x @ lora_down) @ lora_up^T + bias.

    Buffers (natural layout): qweight uint8 [N, K/2] (signed INT4 pairs), wscales [K/64, N],
    smooth [K], lora_down [K, r], lora_up [N, r], bias [N] (optional), shift [K] (optional:
    groups with a positive shift are quantized unsigned), rotation float32 [S, 64, 2] (optional: the
    group rotation of the signed groups, numerics.rotate_groups), smooth_orig [K] (optional, unused
    by the forward; see `format`).

    LoRAs (`svdquant.lora`) are concatenated onto lora_down / lora_up after the model's own
    `base_rank` columns, which are never modified, so removing them is a slice of those columns.

    pow2_weights (set at load): every group scale is a power-of-two fraction of its row's largest
    (numerics.pow2_weight_exponents): power-of-two weight scales (docs/DESIGN.md#scales).
    pow2_activations: quantize the input with power-of-two activation scales
    (numerics.quantize_activations_pow2); off by default, set at load by
    `file_options.apply_file_options`. On Hopper a layer with both runs the fast GEMM with no
    per-group rescaling.
    fp8_execution: run on FP8 tensor cores where they can (docs/DESIGN.md#fp8-execution; off by
    default, set at load by `file_options.apply_file_options`): the product and the model's own
    branch merged into e4m3 weights kept beside the 4-bit ones (+1 byte per weight on the GPU).
    gelu_from: output channels from this one on are GELU (tanh approximation) of the above, fused
    into kernel 2's epilogue (set by `flux.fusion.fuse_mlp_gelu` on the double blocks' MLP input
    layers); None: no activation.

    The forward runs `w4a4_kernel()`, this layer's kernels.W4A4Kernel.
    """

    kind = W4A4
    pow2_activations: bool = False
    fp8_execution: bool = False
    gelu_from: int | None = None
    _kernel: kernels.W4A4Kernel | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 0,
                 shift: bool = False, rotation: bool = False, device=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features)
        k, n, g = in_features, out_features, in_features // GROUP_SIZE
        self.register_buffer("qweight", _empty((n, k // 2), torch.uint8, device))
        self.register_buffer("wscales", _empty((g, n), dtype, device))
        self.register_buffer("smooth", torch.ones(k, dtype=dtype, device=device))
        self.register_buffer("lora_down", torch.zeros((k, rank), dtype=dtype, device=device))
        self.register_buffer("lora_up", torch.zeros((n, rank), dtype=dtype, device=device))
        self.register_buffer("bias", _empty((n,), dtype, device) if bias else None)
        self.register_buffer("shift", torch.zeros(k, dtype=dtype, device=device) if shift else None)
        self.register_buffer("rotation", _empty((numerics.ROTATION_STAGES, GROUP_SIZE, 2), torch.float32, device)
                             if rotation else None)
        self.register_buffer("smooth_orig", None)
        self._after_load()

    @property
    def rank(self) -> int:
        return self.lora_down.shape[1]

    def fp8_weights_bytes(self, device: torch.device, dtype: torch.dtype) -> int:
        """The memory this layer's FP8 weights take where it runs on `device` with `dtype` inputs: 0 in 4-bit
        execution and where FP8 execution does not run (kernels.fp8_execution_runs)."""
        if not (self.fp8_execution and kernels.fp8_execution_runs(device, dtype, self.out_features)):
            return 0
        return fp8.weights_bytes(self.in_features, self.out_features,
                                 self.bias is not None or self.shift is not None)

    def _after_load(self) -> None:
        # per-group signed/unsigned mode follows the shift; computed once, on the CPU
        self.unsigned_groups = numerics.unsigned_groups_from_shift(self.shift, self.in_features)
        # freshly loaded tensors carry no LoRA: all of their rank is the model's own branch
        self.base_rank = self.rank
        self.pow2_weights = (self.wscales.device.type != "meta"
                             and numerics.pow2_weight_exponents(self.wscales) is not None)

    def w4a4_kernel(self, device: torch.device | None = None) -> kernels.W4A4Kernel:
        """This layer's op on its tensors and modes (kernels.W4A4Kernel, with what the kernels derive
        from them), kept until a tensor is replaced (a load, a device move, LoRA columns set) or a
        mode changes. device: a transient one on copies of the tensors made there, for one call (a layer
        ComfyUI's partial load leaves in offload memory); it runs as stored even in FP8 execution, since FP8
        weights made anew at each call take several times the layer's 4-bit bytes of transient memory that
        the partial load did not leave (bench/NOTES.md#fp8-offloaded-layers)."""
        if device is not None:
            modes = {**self._kernel_modes(), "fp8_execution": False}
            return kernels.W4A4Kernel(*(_copied(t, device) for t in self._kernel_tensors()), **modes)
        kernel = self._kernel
        if kernel is None or not self._is_op_of(kernel):
            kernel = self._kernel = kernels.W4A4Kernel(*self._kernel_tensors(), **self._kernel_modes())
        return kernel

    def takes_norm_prologue(self, x: torch.Tensor) -> bool:
        """Whether this layer, called on a pending LayerNorm of x (pending.PendingNorm), computes that LayerNorm in
        its kernel 1's prologue: its tensors are on x's device (not left in offload memory) and the kernels that
        run the call have the prologue (not FP8 execution, not the reference path)."""
        # the device test first, as quantized_forward decides: an offloaded layer runs on copies as stored, so its own
        # routing (which would warn that FP8 execution does not run with weights elsewhere) is not the call's
        return self.qweight.device == x.device and self.w4a4_kernel().takes_norm(x)

    def _kernel_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.qweight, self.wscales, self.smooth, self.lora_down, self.lora_up, self.bias, self.shift,
                self.rotation)

    def _kernel_modes(self) -> dict:
        return {"pow2_weights": self.pow2_weights, "pow2_activations": self.pow2_activations,
                "gelu_from": self.gelu_from, "unsigned_groups": self.unsigned_groups,
                "fp8_execution": self.fp8_execution, "base_rank": self.base_rank}

    def _is_op_of(self, kernel: kernels.W4A4Kernel) -> bool:
        return (all(a is b for a, b in zip(kernel.tensors(), self._kernel_tensors()))
                and kernel.pow2_activations == self.pow2_activations and kernel.gelu_from == self.gelu_from
                and kernel.pow2_weights == self.pow2_weights and kernel.fp8_execution == self.fp8_execution
                and kernel.base_rank == self.base_rank)

    def _apply(self, fn, recurse=True):
        # a move or cast replaces the tensors: the kept kernel would hold the old ones (and their device
        # memory) until the next call
        self._kernel = None
        module = super()._apply(fn, recurse)
        if self.fp8_weights_bytes(self.qweight.device, self.wscales.dtype):
            # made on arrival, while a loader has the room it counted for them; made at the first call they would
            # be placed between the activations' allocations and fragment the allocator's cache
            # (bench/NOTES.md#fp8-offloaded-layers)
            fp8.weights(self.w4a4_kernel())
        return module

    def register_buffer(self, name, tensor, persistent=True):
        # the same for a tensor swapped in without a move (ComfyUI's DynamicVRAM loads and unloads a model's
        # buffers so): unloading frees the kept kernel's tensors, FP8 weights included
        self._kernel = None
        super().register_buffer(name, tensor, persistent)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SVDQLinear":
        n, half_k = tensors["qweight"].shape
        layer = cls(half_k * 2, n, bias="bias" in tensors, rank=tensors["lora_down"].shape[1],
                    shift="shift" in tensors, rotation="rotation" in tensors, device=tensors["qweight"].device,
                    dtype=tensors["wscales"].dtype)
        layer.load_state_dict(tensors)
        return layer


class W4A16Linear(_QuantizedLinearBase):
    """y = x @ W^T + bias with W[n, k] = code[n, k] * wscales[g, n] + wzeros[g, n] (g = k // 64).

    Buffers: qweight uint8 [N, K/2] (unsigned INT4 pairs), wscales and wzeros [K/64, N], bias [N].

    LoRAs (`svdquant.lora`) run as a 16-bit low-rank side branch, y += (x @ lora_down) @ lora_up^T,
    rather than being merged into W: merging would need a 16-bit copy of W or a lossy
    requantization that could not be undone exactly. The branch is not part of the state dict.
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
        self._after_load()

    def _after_load(self) -> None:
        # freshly loaded tensors carry no LoRA
        self.register_buffer("lora_down", None, persistent=False)  # [K, r] while LoRAs are set
        self.register_buffer("lora_up", None, persistent=False)  # [N, r]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "W4A16Linear":
        n, half_k = tensors["qweight"].shape
        layer = cls(half_k * 2, n, bias="bias" in tensors, device=tensors["qweight"].device,
                    dtype=tensors["wscales"].dtype)
        layer.load_state_dict(tensors)
        return layer


def become_stored_kind(module: nn.Module, classes: dict[str, type], state_dict: dict, prefix: str,
                       local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """`_load_from_state_dict` of a placeholder linear layer: turn `module` in place into a fresh
    `classes[kind]` (kind: what the state dict stores at prefix), then load it as that class.

    The module has in_features, out_features, has_bias and device (how the model built it) and
    dtype (None: the file's). classes maps DENSE, W4A4, W4A16 to constructors taking
    (in_features, out_features, bias=, device=, dtype=) (and rank=, shift= for W4A4). In place
    because the parent modules hold this object; the fresh layer's own constructor sets it up.
    """
    kind = stored_kind(state_dict, prefix)
    kwargs = {}
    if kind == DENSE:
        bias, stored_dtype = module.has_bias, state_dict.get(prefix + "weight", torch.empty(0)).dtype
    else:
        if module.in_features % GROUP_SIZE:
            error_msgs.append(f"{prefix[:-1]}: a quantized layer needs an input width that is a multiple of "
                              f"{GROUP_SIZE}, not {module.in_features}")
            return
        # a quantized layer may carry a bias the original lacked (the shift correction of GELU inputs)
        bias = module.has_bias or prefix + "bias" in state_dict
        stored_dtype = state_dict[prefix + "wscales"].dtype
        if kind == W4A4:
            lora_down = state_dict.get(prefix + "lora_down")
            kwargs = {"rank": lora_down.shape[1] if lora_down is not None and lora_down.dim() == 2 else 0,
                      "shift": prefix + "shift" in state_dict}
    fresh = classes[kind](module.in_features, module.out_features, bias=bias, device=module.device,
                          dtype=module.dtype or stored_dtype, **kwargs)
    module.__class__ = type(fresh)
    module.__dict__ = fresh.__dict__
    if kind != DENSE:
        _register(module)
    module._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                 error_msgs)


class LoadedLinear(nn.Module):
    """A linear layer that becomes, when its state dict is loaded, what the state dict stores:
    an SVDQLinear, a W4A16Linear or an nn.Linear. Float tensors are converted to `dtype` when one
    is given. Nothing is allocated before that; a forward before that is an error."""

    classes = {DENSE: nn.Linear, W4A4: SVDQLinear, W4A16: W4A16Linear}

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.has_bias, self.device, self.dtype = bias, device, dtype

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        become_stored_kind(self, self.classes, state_dict, prefix, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"a {type(self).__name__} was used before its state dict was loaded")
