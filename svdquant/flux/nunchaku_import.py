"""Import of nunchaku's single-file INT4 FLUX models into the natural layout.

The nunchaku-format file keeps diffusers-style names, tile-packed tensors and separate layers where
ComfyUI fuses them. Numbers in comments refer to the steps listed in
docs/DESIGN.md#nunchaku-import; the layer-level unpacking (2-5, 13, 14) is in `nunchaku_format`.
What is kept as nunchaku made it: lora_down already acts on the unsmoothed input (6),
padded zero rank columns (7), smoothing folded upstream (8: `smooth` ones, the factor kept as
`smooth_orig`), q/k/v row order (10).
"""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from .. import format as fmt
from .. import nunchaku_format, numerics

# 1. names
DENSE_LAYERS = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "proj_out": "final_layer.linear",
}
DOUBLE_W4A4 = {
    "qkv_proj": "img_attn.qkv", "qkv_proj_context": "txt_attn.qkv",
    "out_proj": "img_attn.proj", "out_proj_context": "txt_attn.proj",
    "mlp_fc1": "img_mlp.0", "mlp_fc2": "img_mlp.2",
    "mlp_context_fc1": "txt_mlp.0", "mlp_context_fc2": "txt_mlp.2",
}
GELU_INPUT = {"mlp_fc2", "mlp_context_fc2"}  # 9. quantized unsigned after the GELU shift
DOUBLE_W4A16 = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
DOUBLE_NORMS = {
    "norm_q.weight": "img_attn.norm.query_norm.scale", "norm_k.weight": "img_attn.norm.key_norm.scale",
    "norm_added_q.weight": "txt_attn.norm.query_norm.scale", "norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_NORMS = {"norm_q.weight": "norm.query_norm.scale", "norm_k.weight": "norm.key_norm.scale"}
# (required fields, optional fields) of a nunchaku-format layer
W4A4_FIELDS = (("qweight", "wscales", "bias", "smooth", "lora_down", "lora_up"), ("smooth_orig",))
W4A16_FIELDS = (("qweight", "wscales", "wzeros", "bias"), ())
# a nunchaku key no other model family has: how a file without metadata is recognised
SIGNATURE_KEY = "transformer_blocks.0.qkv_proj.qweight"


def is_nunchaku_file(path, metadata: dict[str, str]) -> bool:
    """Whether the file is a nunchaku-format model (of any architecture)."""
    if metadata.get("model_class", "").startswith("Nunchaku") or "quantization_config" in metadata:
        return True
    with safe_open(str(path), framework="pt") as f:
        return SIGNATURE_KEY in f.keys()


class _Reader:
    """Hands out the file's tensors by name and remembers which were used."""

    def __init__(self, path, tensors: dict[str, torch.Tensor]):
        self.path, self.tensors, self.used = path, tensors, set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise fmt.FormatError(self.path, f"missing tensor {key}")
        self.used.add(key)
        return self.tensors[key]

    def take_layer(self, prefix: str, fields) -> dict[str, torch.Tensor]:
        """A quantized layer's tensors by field, checked against each other (ValueError naming one)."""
        required, optional = fields
        layer = {f: self.take(f"{prefix}.{f}") for f in required + optional
                 if f in required or f"{prefix}.{f}" in self.tensors}
        check = nunchaku_format.check_w4a16_layer if fields == W4A16_FIELDS else nunchaku_format.check_w4a4_layer
        check(prefix, layer)
        return layer

    def count(self, prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in self.tensors if k.startswith(prefix)})


def _w4a4(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = nunchaku_format.unpack_w4a4_layer(packed)
    if "smooth_orig" in packed:  # 4. same permutation as smooth; kept only where it is not `smooth` (8)
        smooth_orig = nunchaku_format.unpack_w4a4_vector(packed["smooth_orig"])
        if not torch.equal(smooth_orig, out["smooth"]):
            out["smooth_orig"] = smooth_orig
    return out


def _with_gelu_shift(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """9. Nunchaku always shifts an mlp_fc2 input; its bias already compensates."""
    k = layer["smooth"].shape[0]
    return {**layer, "shift": torch.full((k,), numerics.GELU_SHIFT, dtype=layer["smooth"].dtype,
                                          device=layer["smooth"].device)}


def _fuse_rows(qkv: dict, mlp_in: dict) -> dict[str, torch.Tensor]:
    """11. linear1 = [qkv_proj; mlp_fc1] along N: one input, so one smooth; block-diagonal lora_up."""
    for field in ("smooth", "smooth_orig"):
        if not torch.equal(qkv.get(field, qkv["smooth"]), mlp_in.get(field, mlp_in["smooth"])):
            raise ValueError(f"qkv_proj and mlp_fc1 have different {field} vectors but share their input")
    out = {
        "qweight": torch.cat([qkv["qweight"], mlp_in["qweight"]]),
        "wscales": torch.cat([qkv["wscales"], mlp_in["wscales"]], dim=1),
        "smooth": qkv["smooth"],
        "lora_down": torch.cat([qkv["lora_down"], mlp_in["lora_down"]], dim=1),
        "lora_up": torch.block_diag(qkv["lora_up"], mlp_in["lora_up"]),
        "bias": torch.cat([qkv["bias"], mlp_in["bias"]]),
    }
    if "smooth_orig" in qkv:
        out["smooth_orig"] = qkv["smooth_orig"]
    return out


def _fuse_columns(attn_out: dict, mlp_out: dict) -> dict[str, torch.Tensor]:
    """12. linear2 = [out_proj | mlp_fc2] along K: the MLP columns alone are shifted and unsigned,
    lora_down is block diagonal, and the two biases (which nunchaku adds separately)
    are summed."""
    def cat(field: str) -> torch.Tensor:
        return torch.cat([attn_out.get(field, attn_out["smooth"]), mlp_out.get(field, mlp_out["smooth"])])

    out = {
        # packed pairs run along K, so concatenating packed rows concatenates the codes
        "qweight": torch.cat([attn_out["qweight"], mlp_out["qweight"]], dim=1),
        "wscales": torch.cat([attn_out["wscales"], mlp_out["wscales"]]),
        "smooth": cat("smooth"),
        "shift": torch.cat([torch.zeros_like(attn_out["smooth"]), mlp_out["shift"]]),
        "lora_down": torch.block_diag(attn_out["lora_down"], mlp_out["lora_down"]),
        "lora_up": torch.cat([attn_out["lora_up"], mlp_out["lora_up"]], dim=1),
        "bias": (attn_out["bias"].float() + mlp_out["bias"].float()).to(mlp_out["bias"].dtype),
    }
    if "smooth_orig" in attn_out or "smooth_orig" in mlp_out:
        out["smooth_orig"] = cat("smooth_orig")
    return out


def _modulation(packed: dict[str, torch.Tensor], chunks: int) -> dict[str, torch.Tensor]:
    """A W4A16 AdaNorm linear: unpack (13, 14), undo the row interleave (15) and the +1 (16)."""
    layer = nunchaku_format.unpack_w4a16_layer(packed)
    n = layer["qweight"].shape[0]
    hidden = n // chunks

    def rows(t: torch.Tensor) -> torch.Tensor:  # nunchaku row chunks*d + c -> ComfyUI row c*hidden + d
        return t.reshape(hidden, chunks, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def columns(t: torch.Tensor) -> torch.Tensor:
        return rows(t.t()).t().contiguous()

    bias = rows(layer["bias"]).float()
    for c in {1, chunks - 2}:  # the "scale" chunks: scale_msa, scale_mlp (double) or scale (single)
        bias[c * hidden:(c + 1) * hidden] -= 1.0
    return {"qweight": rows(layer["qweight"]), "wscales": columns(layer["wscales"]),
            "wzeros": columns(layer["wzeros"]), "bias": bias.to(layer["bias"].dtype)}


def _config(path, metadata: dict[str, str]) -> dict:
    """18. ComfyUI's config from `comfy_config`; empty (shapes decide) when the file has none."""
    if "comfy_config" not in metadata:
        return {}
    try:
        return json.loads(metadata["comfy_config"])["model_config"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise fmt.FormatError(path, f"bad comfy_config metadata ({exc})") from None


def _check_quantization(path, metadata: dict[str, str]) -> dict:
    model_class = metadata.get("model_class", "")
    if model_class and "Flux" not in model_class:
        raise fmt.FormatError(path, f"a nunchaku-format {model_class} model, not a FLUX model")
    try:
        config = json.loads(metadata.get("quantization_config", "{}"))
    except json.JSONDecodeError as exc:
        raise fmt.FormatError(path, f"bad quantization_config metadata ({exc})") from None
    weight = config.get("weight", {})
    if weight.get("dtype", "int4") != "int4":
        raise fmt.FormatError(path, f"{weight['dtype']} weights (NVFP4 models) are not supported; only INT4 models are")
    if weight.get("group_size", numerics.GROUP_SIZE) != numerics.GROUP_SIZE:
        raise fmt.FormatError(path, f"unsupported group size {weight['group_size']}")
    return config


def import_model(path, metadata: dict[str, str], device: str | torch.device = "cpu") -> fmt.QuantizedModel:
    """Read a nunchaku-format FLUX file into a natural `QuantizedModel` with ComfyUI names."""
    quantization_config = _check_quantization(path, metadata)
    reader = _Reader(path, fmt.load_tensors(path, device))
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}

    def add_w4a4(name: str, layer: dict) -> None:
        tensors.update({f"{name}.{f}": t for f, t in layer.items()})
        layers[name] = fmt.describe_w4a4(layer)

    def add_w4a16(name: str, layer: dict) -> None:
        tensors.update({f"{name}.{f}": t for f, t in layer.items()})
        layers[name] = fmt.describe_w4a16(layer)

    try:
        for ref, name in DENSE_LAYERS.items():
            if f"{ref}.weight" not in reader.tensors:
                continue  # the guidance embedder exists in dev models only
            weight, bias = reader.take(f"{ref}.weight"), reader.take(f"{ref}.bias")
            if ref == "norm_out.linear":  # 17. diffusers [scale; shift] -> ComfyUI [shift; scale]
                weight, bias = weight.roll(weight.shape[0] // 2, dims=0), bias.roll(bias.shape[0] // 2)
            tensors[f"{name}.weight"], tensors[f"{name}.bias"] = weight, bias

        for i in range(reader.count("transformer_blocks.")):
            ref, out = f"transformer_blocks.{i}", f"double_blocks.{i}"
            for part, name in DOUBLE_W4A4.items():
                layer = _w4a4(reader.take_layer(f"{ref}.{part}", W4A4_FIELDS))
                add_w4a4(f"{out}.{name}", _with_gelu_shift(layer) if part in GELU_INPUT else layer)
            for part, name in DOUBLE_W4A16.items():
                add_w4a16(f"{out}.{name}", _modulation(reader.take_layer(f"{ref}.{part}", W4A16_FIELDS), 6))
            for part, name in DOUBLE_NORMS.items():
                tensors[f"{out}.{name}"] = reader.take(f"{ref}.{part}")

        for i in range(reader.count("single_transformer_blocks.")):
            ref, out = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            part = {p: _w4a4(reader.take_layer(f"{ref}.{p}", W4A4_FIELDS))
                    for p in ("qkv_proj", "mlp_fc1", "out_proj", "mlp_fc2")}
            add_w4a4(f"{out}.linear1", _fuse_rows(part["qkv_proj"], part["mlp_fc1"]))
            add_w4a4(f"{out}.linear2", _fuse_columns(part["out_proj"], _with_gelu_shift(part["mlp_fc2"])))
            add_w4a16(f"{out}.modulation.lin", _modulation(reader.take_layer(f"{ref}.norm.linear", W4A16_FIELDS), 3))
            for part_name, name in SINGLE_NORMS.items():
                tensors[f"{out}.{name}"] = reader.take(f"{ref}.{part_name}")
    except ValueError as exc:  # a nunchaku-format layer whose shapes the unpacking cannot take
        raise fmt.FormatError(path, f"cannot import the nunchaku layout: {exc}") from None

    left = sorted(set(reader.tensors) - reader.used)
    if left:
        raise fmt.FormatError(path, f"tensors this importer does not know: {', '.join(left[:5])}"
                                    + (f" and {len(left) - 5} more" if len(left) > 5 else ""))
    quantization = {"method": "svdquant", "group_size": numerics.GROUP_SIZE, "act_shift": numerics.GELU_SHIFT,
                    "rank": quantization_config.get("rank"), "imported_from": "reference single-file INT4"}
    model = fmt.QuantizedModel(tensors, layers, "flux", _config(path, metadata), quantization)
    fmt.validate(path, model)
    return model

