"""The natural SVDQuant file: one safetensors file per model.

Tensors, per quantized layer `P` (N outputs, K inputs, rank r, G = K / 64):
  W4A4  (kind "w4a4"):  P.qweight uint8 [N, K/2] (signed INT4 pairs, low nibble = even column),
                        P.wscales [G, N], P.smooth [K], P.lora_down [K, r], P.lora_up [N, r],
                        P.bias [N] (optional), P.shift [K] (optional, unsigned groups where > 0),
                        P.smooth_orig [K] (optional, see below), P.rotation float32 [S, 64, 2]
                        (optional: the group rotation of the signed input groups in S stages, a
                        multiple of 6, numerics.rotate_groups; qweight then holds the rotated residual)
  W4A16 (kind "w4a16"): P.qweight uint8 [N, K/2] (unsigned INT4 pairs), P.wscales [G, N],
                        P.wzeros [G, N], P.bias [N] (optional)
Every other tensor is an unquantized tensor of the model, stored as is.

smooth_orig is the smoothing factor the quantizer chose where it differs from `smooth`: models
imported from nunchaku-format files have some factors folded into the layer that produces the
input (its `smooth` is then all ones), so that layer's runtime input is the original model's
input divided by smooth_orig. The forward never reads it; whatever acts on such a layer in the
original model's terms (a LoRA) needs it. Absent means equal to `smooth`.

Metadata (all strings, as safetensors requires):
  format          "svdquant"
  format_version  "2" where a layer has a rotation, else "1" (READ_VERSIONS)
  quantization    JSON {"method": "svdquant", "group_size": 64, "rank": r, "act_shift": 0.171875,
                  "pow2_scales": whether the W4A4 weights have power-of-two scales (docs/DESIGN.md#scales), ...}
  layers          JSON {P: {"kind", "in", "out", "rank" (w4a4), "bias", "shift", "smooth_orig", "rotation" (w4a4:
                  the rotation's stages, 0 for none)}}
  model_type      e.g. "flux"
  model_config    JSON, the model's configuration (opaque here; the model builder reads it)

`load_model` validates all of it and raises FormatError naming the file and the tensor.
`save_model` writes to a temporary file and renames it into place only when complete.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import numerics

FORMAT_NAME = "svdquant"
# Version 2 adds the group rotation. A file without one is written as version 1, so that an engine
# from before the rotation, which would ignore the tensor and compute another function, refuses only
# the files it cannot run.
FORMAT_VERSION = 2
READ_VERSIONS = ("1", "2")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# quantization metadata keys of files written before a name was settled -> the name read now
OLD_QUANTIZATION_KEYS = {"hopper_pow2": "pow2_scales"}


class FormatError(ValueError):
    """A model file that cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{Path(path).name}: {problem}")


@dataclass
class QuantizedModel:
    """What a model file holds: all tensors, the per-layer descriptions and the configuration."""

    tensors: dict[str, torch.Tensor]
    layers: dict[str, dict]
    model_type: str
    model_config: dict
    quantization: dict = field(default_factory=lambda: {
        "method": "svdquant", "group_size": numerics.GROUP_SIZE, "act_shift": numerics.GELU_SHIFT})

    def layer_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors of one quantized layer, keyed by field name."""
        return {name: self.tensors[f"{prefix}.{name}"] for name in LAYER_FIELDS[self.layers[prefix]["kind"]]
                if f"{prefix}.{name}" in self.tensors}


# every field a quantized layer of each kind can have (expected_layer_tensors: which it must have)
LAYER_FIELDS = {
    "w4a4": ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "shift", "smooth_orig", "rotation"),
    "w4a16": ("qweight", "wscales", "wzeros", "bias"),
}


def expected_layer_tensors(desc: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Field -> (shape, dtype class) for one layer description; dtype class 'u8', 'float' (the layer's
    float dtype) or 'f32' (float32 whatever the layer's dtype)."""
    kind, k, n = desc.get("kind"), int(desc["in"]), int(desc["out"])
    if k % numerics.GROUP_SIZE or k % 2:
        raise ValueError(f"input width {k} is not a multiple of {numerics.GROUP_SIZE}")
    g = k // numerics.GROUP_SIZE
    if kind == "w4a4":
        r = int(desc["rank"])
        out = {"qweight": ((n, k // 2), "u8"), "wscales": ((g, n), "float"), "smooth": ((k,), "float"),
               "lora_down": ((k, r), "float"), "lora_up": ((n, r), "float")}
        if desc.get("shift"):
            out["shift"] = ((k,), "float")
        if desc.get("smooth_orig"):
            out["smooth_orig"] = ((k,), "float")
        stages = int(desc.get("rotation") or 0)
        if stages % numerics.ROTATION_STAGES or stages < 0:
            raise ValueError(f"a rotation of {stages} stages (a multiple of {numerics.ROTATION_STAGES} is needed)")
        if stages:
            out["rotation"] = ((stages, numerics.GROUP_SIZE, 2), "f32")
    elif kind == "w4a16":
        out = {"qweight": ((n, k // 2), "u8"), "wscales": ((g, n), "float"), "wzeros": ((g, n), "float")}
    else:
        raise ValueError(f"unknown layer kind {kind!r}")
    if desc.get("bias"):
        out["bias"] = ((n,), "float")
    return out


def describe_w4a4(tensors: dict[str, torch.Tensor]) -> dict:
    n, half_k = tensors["qweight"].shape
    return {"kind": "w4a4", "in": half_k * 2, "out": n, "rank": tensors["lora_down"].shape[1],
            "bias": "bias" in tensors, "shift": "shift" in tensors, "smooth_orig": "smooth_orig" in tensors,
            "rotation": tensors["rotation"].shape[0] if "rotation" in tensors else 0}


def describe_w4a16(tensors: dict[str, torch.Tensor]) -> dict:
    n, half_k = tensors["qweight"].shape
    return {"kind": "w4a16", "in": half_k * 2, "out": n, "bias": "bias" in tensors}


def validate(path, model: QuantizedModel) -> None:
    """Every quantized layer's tensors match its description, and no tensor holds NaN or Inf."""
    tensors = model.tensors
    claimed: set[str] = set()
    for prefix, desc in model.layers.items():
        try:
            expected = expected_layer_tensors(desc)
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(path, f"layer {prefix}: bad description {desc!r} ({exc})") from None
        for name, (shape, dtype_class) in expected.items():
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise FormatError(path, f"missing tensor {key}")
            t = tensors[key]
            if dtype_class == "u8" and t.dtype != torch.uint8:
                raise FormatError(path, f"tensor {key} has dtype {t.dtype}, expected torch.uint8")
            if dtype_class == "f32" and t.dtype != torch.float32:
                raise FormatError(path, f"tensor {key} has dtype {t.dtype}, expected torch.float32")
            if dtype_class == "float" and t.dtype not in FLOAT_DTYPES:
                raise FormatError(path, f"tensor {key} has dtype {t.dtype}, expected bfloat16, float16 or float32")
            # writers store a layer's float tensors in one dtype (wscales' is checked first) and the
            # loader converts the others to it, so a bfloat16 tensor relabelled float16 would load
            # as other numbers
            if dtype_class == "float" and t.dtype != tensors[f"{prefix}.wscales"].dtype:
                raise FormatError(path, f"tensor {key} has dtype {t.dtype}, unlike the "
                                        f"{tensors[f'{prefix}.wscales'].dtype} of {prefix}.wscales")
            if tuple(t.shape) != shape:
                raise FormatError(path, f"tensor {key} has shape {tuple(t.shape)}, expected {shape}")
            claimed.add(key)
        for name in LAYER_FIELDS[desc["kind"]]:
            key = f"{prefix}.{name}"
            if key in tensors and key not in claimed:
                raise FormatError(path, f"tensor {key} is not described by layer {prefix}'s metadata")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise FormatError(path, f"tensor {key} contains NaN or Inf")


def format_version(layers: dict[str, dict]) -> str:
    """The format_version a file of these layer descriptions is written with (see FORMAT_VERSION)."""
    return str(FORMAT_VERSION) if any(desc.get("rotation") for desc in layers.values()) else "1"


def save_model(path, model: QuantizedModel) -> None:
    """Validate and write `model` to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    validate(path, model)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": format_version(model.layers),
        "quantization": json.dumps(model.quantization),
        "layers": json.dumps(model.layers),
        "model_type": model.model_type,
        "model_config": json.dumps(model.model_config),
    }
    tmp = path.with_name(path.name + ".partial")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# bytes per element of each safetensors dtype torch can hold
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                           "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
                           "C64": 8}


def _json_header(path) -> tuple[dict, int]:
    """A safetensors file's JSON header, read alone (no tensor data, no memory map), and the number
    of data bytes after it; ValueError saying what makes it unreadable."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= size - 8:
            raise ValueError(f"its header length {length} does not fit in the file's {size} bytes")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"its header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, size - 8 - length


def header_problem(path) -> str | None:
    """What is wrong with a safetensors file's header, naming the tensor at fault where one is;
    None where no fault is found. safetensors' own errors name no tensor for a bad dtype,
    shape or offset, so an unreadable file is diagnosed here."""
    try:
        header, data_bytes = _json_header(path)
    except ValueError as exc:
        return str(exc)
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            return f"tensor {key}: its header entry is {entry!r}, not a description"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            return f"tensor {key}: unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            return f"tensor {key}: shape {shape!r} is not a list of sizes"
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            return f"tensor {key}: data_offsets {offsets!r} are not a (begin, end) byte range"
        needed = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != needed:
            return (f"tensor {key}: dtype {dtype} and shape {shape} need {needed} bytes, its data_offsets "
                    f"{offsets} hold {offsets[1] - offsets[0]}")
        if offsets[1] > data_bytes:
            return f"tensor {key}: data_offsets {offsets} run past the file's {data_bytes} data bytes (truncated?)"
        spans.append((offsets[0], offsets[1], key))
    end, previous = 0, None
    for begin, stop, key in sorted(spans):
        if begin != end:
            after = f"{previous} ends at {end}" if previous else "the data begins at 0"
            return f"tensor {key}: data_offsets [{begin}, {stop}] do not follow on ({after})"
        end, previous = stop, key
    if end != data_bytes:
        last = f"tensor {previous}: its data" if previous else "the tensors' data"
        return f"{last} ends at byte {end}, the file holds {data_bytes} data bytes"
    return None


def _unreadable(path, exc: Exception) -> FormatError:
    try:
        problem = header_problem(path)
    except OSError:
        problem = None
    return FormatError(path, f"not a readable safetensors file ({problem or exc})")


def read_header(path) -> dict[str, str]:
    """The file's metadata; FormatError if it is not a readable safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(path, "no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise _unreadable(path, exc) from None


def remembered_per_file(missing):
    """Decorator: `function(path)`, a verdict on a file from its header, remembered per path,
    modification time and size, so that listing a model folder again costs a stat per file; a path
    that cannot be stat'ed gives `missing`."""
    def decorate(function):
        @functools.lru_cache(maxsize=4096)
        def remembered(path: str, mtime_ns: int, size: int):
            return function(path)

        @functools.wraps(function)
        def lookup(path):
            try:
                stat = os.stat(path)
            except OSError:
                return missing
            return remembered(str(path), stat.st_mtime_ns, stat.st_size)
        return lookup
    return decorate


def read_header_only(path) -> tuple[dict[str, str], list[str]] | None:
    """(metadata, tensor names) from the safetensors header alone (its first 8 + length bytes, no
    tensor data and no memory map), for listing model folders cheaply; None where the file has no
    readable safetensors header."""
    try:
        header, _ = _json_header(path)
    except (OSError, ValueError):
        return None
    metadata = header.get("__metadata__")
    metadata = metadata if isinstance(metadata, dict) else {}
    return {str(k): str(v) for k, v in metadata.items()}, [key for key in header if key != "__metadata__"]


def load_tensors(path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; FormatError for a truncated or corrupt file."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:
        raise _unreadable(path, exc) from None


def is_natural_file(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT_NAME


def load_model(path, device: str | torch.device = "cpu") -> QuantizedModel:
    """Read and validate a natural SVDQuant file."""
    metadata = read_header(path)
    if not is_natural_file(metadata):
        raise FormatError(path, f"not an SVDQuant natural file (format={metadata.get('format')!r})")
    version = metadata.get("format_version")
    if version not in READ_VERSIONS:
        raise FormatError(path, f"unsupported format version {version!r} (this engine reads "
                                f"{' and '.join(READ_VERSIONS)})")
    try:
        layers = json.loads(metadata["layers"])
        quantization = json.loads(metadata["quantization"])
        model_config = json.loads(metadata.get("model_config", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"bad metadata ({exc})") from None
    for old, new in OLD_QUANTIZATION_KEYS.items():
        if old in quantization:
            quantization.setdefault(new, quantization.pop(old))
    if quantization.get("group_size") != numerics.GROUP_SIZE:
        raise FormatError(path, f"unsupported group size {quantization.get('group_size')!r}")
    model = QuantizedModel(load_tensors(path, device), layers, metadata.get("model_type", ""), model_config,
                           quantization)
    validate(path, model)
    return model
