"""The natural file: round trip, atomic writes, and bad files rejected with named errors."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from svdquant import format as fmt
from svdquant import quantize
from svdquant.linear import SVDQLinear


def _model():
    torch.manual_seed(0)
    w = torch.randn(128, 128) * 0.05
    x = torch.randn(32, 128)
    plain = quantize.quantize_linear(w, torch.randn(128), x, rank=16, alphas=(0.5,)).as_dict()
    shifted = quantize.quantize_linear(w, None, x.clamp_min(-0.17), rank=16, alphas=(0.5,),
                                       shift=torch.full((128,), 0.171875)).as_dict()
    from svdquant import numerics
    codes, ws, wz = numerics.quantize_w4a16(torch.randn(256, 128) * 0.05)
    mod = {"qweight": numerics.pack_int4(codes), "wscales": ws, "wzeros": wz, "bias": torch.zeros(256).bfloat16()}
    tensors = {f"a.{k}": v for k, v in plain.items()}
    tensors.update({f"b.{k}": v for k, v in shifted.items()})
    tensors.update({f"mod.{k}": v for k, v in mod.items()})
    tensors["img_in.weight"] = torch.randn(128, 64).bfloat16()
    layers = {"a": fmt.describe_w4a4(plain), "b": fmt.describe_w4a4(shifted), "mod": fmt.describe_w4a16(mod)}
    return fmt.QuantizedModel(tensors, layers, "flux", {"hidden_size": 128})


def test_round_trip(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    fmt.save_model(path, model)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    back = fmt.load_model(path)
    assert back.layers == model.layers and back.model_type == "flux" and back.model_config == {"hidden_size": 128}
    assert back.tensors.keys() == model.tensors.keys()
    for key, t in model.tensors.items():
        assert back.tensors[key].dtype == t.dtype and torch.equal(back.tensors[key], t), key
    assert back.layers["b"]["shift"] and not back.layers["a"]["shift"]
    layer = SVDQLinear.from_tensors(back.layer_tensors("b"))
    assert layer.unsigned_groups.all()
    # the default rotation turns the signed layer only; it makes the file version 2
    assert back.layers["a"]["rotation"] and not back.layers["b"]["rotation"]
    assert fmt.read_header(path)["format_version"] == "2"
    rotated = SVDQLinear.from_tensors(back.layer_tensors("a"))
    assert rotated.rotation.dtype == torch.float32 and torch.equal(rotated.rotation, model.tensors["a.rotation"])


def test_a_file_without_rotation_is_version_1(tmp_path):
    """Engines before the rotation read version 1 only: a file that needs none stays readable to them."""
    model = _model()
    del model.tensors["a.rotation"]
    model.layers["a"]["rotation"] = False
    path = tmp_path / "v1.safetensors"
    fmt.save_model(path, model)
    assert fmt.read_header(path)["format_version"] == "1"
    assert not fmt.load_model(path).layers["a"]["rotation"]


def _rewrite(path, tensors, metadata):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def _saved(tmp_path):
    path = tmp_path / "good.safetensors"
    fmt.save_model(path, _model())
    header = fmt.read_header(path)
    return path, fmt.load_tensors(path), header


def test_truncated_file(tmp_path):
    path, _, _ = _saved(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(fmt.FormatError, match="truncated.safetensors"):
        fmt.load_model(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(fmt.FormatError, match="junk.safetensors: not a readable safetensors file"):
        fmt.load_model(junk)
    with pytest.raises(fmt.FormatError, match="no such file"):
        fmt.load_model(tmp_path / "missing.safetensors")


def test_corrupt_header_length(tmp_path):
    path, _, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(fmt.FormatError, match="header.safetensors"):
        fmt.load_model(bad)


@pytest.mark.parametrize("case, message", [
    ("wrong_dtype", "tensor a.qweight has dtype torch.int8, expected torch.uint8"),
    ("float_as_int", "tensor a.wscales has dtype torch.int32"),
    ("missing", "missing tensor a.lora_up"),
    ("wrong_shape", r"tensor a.lora_down has shape \(128, 8\), expected \(128, 16\)"),
    ("nan", "tensor b.bias contains NaN or Inf"),
    ("undescribed", "tensor a.shift is not described"),
    ("rotation_dtype", "tensor a.rotation has dtype torch.bfloat16, expected torch.float32"),
])
def test_bad_tensors_are_named(tmp_path, case, message):
    path, tensors, header = _saved(tmp_path)
    if case == "wrong_dtype":
        tensors["a.qweight"] = tensors["a.qweight"].to(torch.int8)
    elif case == "float_as_int":
        tensors["a.wscales"] = tensors["a.wscales"].to(torch.int32)
    elif case == "missing":
        del tensors["a.lora_up"]
    elif case == "wrong_shape":
        tensors["a.lora_down"] = tensors["a.lora_down"][:, :8]
    elif case == "nan":
        tensors["b.bias"] = tensors["b.bias"].clone()
        tensors["b.bias"][3] = float("nan")
    elif case == "undescribed":
        tensors["a.shift"] = torch.zeros(128, dtype=torch.bfloat16)
    elif case == "rotation_dtype":
        tensors["a.rotation"] = tensors["a.rotation"].bfloat16()
    bad = tmp_path / f"{case}.safetensors"
    _rewrite(bad, tensors, header)
    with pytest.raises(fmt.FormatError, match=f"{case}.safetensors: {message}"):
        fmt.load_model(bad)


def _edit_header(path, out, edit):
    """Write `out`: `path` with its JSON header changed by edit(header), its data bytes unchanged."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])


def _set(key, field, value):
    return lambda header: header[key].__setitem__(field, value)


def _shift_offsets(key, by):
    return lambda header: header[key].__setitem__("data_offsets", [o + by for o in header[key]["data_offsets"]])


def _last_key(header):
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])


def _extend_last(header):
    header[_last_key(header)]["data_offsets"][1] += 2


UNREADABLE = r"not a readable safetensors file \("  # safetensors' own error names no tensor


@pytest.mark.parametrize("edit, message", [
    (_set("a.wscales", "dtype", "F32"), UNREADABLE + r"tensor a.wscales: dtype F32 and shape \[2, 128\] need 1024 "
                                                     r"bytes, its data_offsets \[\d+, \d+\] hold 512\)$"),
    (_set("a.wscales", "dtype", "Q4"), UNREADABLE + r"tensor a.wscales: unknown dtype 'Q4'\)$"),
    (_set("a.lora_down", "shape", [128, 32]), UNREADABLE + r"tensor a.lora_down: dtype BF16 and shape \[128, 32\] "
                                                           r"need"),
    (_set("a.lora_down", "shape", "128x16"), UNREADABLE + r"tensor a.lora_down: shape '128x16' is not a list"),
    (_set("a.lora_down", "data_offsets", [8]), UNREADABLE + r"tensor a.lora_down: data_offsets \[8\] are not a"),
    (_shift_offsets("a.smooth", 2), UNREADABLE + r"tensor a.smooth: data_offsets \[\d+, \d+\] do not follow on "
                                                 r"\(\S+ ends at \d+\)\)$"),
    (_shift_offsets("a.smooth", -2), UNREADABLE + r"tensor a.smooth: data_offsets \[\d+, \d+\] do not follow on "
                                                  r"\(\S+ ends at \d+\)\)$"),
    (_extend_last, UNREADABLE + r"tensor \S+: dtype \w+ and shape \[[\d, ]+\] need \d+ bytes"),
    # same size, so safetensors reads it; the layer's other tensors tell
    (_set("a.smooth", "dtype", "F16"), "tensor a.smooth has dtype torch.float16, unlike the torch.bfloat16 of "
                                       "a.wscales$"),
], ids=["dtype-size", "dtype-unknown", "shape-size", "shape-not-a-list", "offsets-not-a-range", "offsets-later",
        "offsets-earlier", "offsets-past-the-end", "dtype-same-size"])
def test_corrupt_header_entries_name_the_tensor(tmp_path, edit, message):
    path, _, _ = _saved(tmp_path)
    bad = tmp_path / "corrupt.safetensors"
    _edit_header(path, bad, edit)
    with pytest.raises(fmt.FormatError, match=f"^corrupt.safetensors: {message}"):
        fmt.load_model(bad)


def test_the_header_alone_is_read_for_listing(tmp_path):
    path, tensors, header = _saved(tmp_path)
    metadata, names = fmt.read_header_only(path)
    assert metadata == header and sorted(names) == sorted(tensors)
    data = path.read_bytes()
    for name, content in {"junk": b"not a safetensors file at all", "cut": data[:20],
                          "text": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}",
                          "list": b"\x02\x00\x00\x00\x00\x00\x00\x00[]"}.items():
        (tmp_path / name).write_bytes(content)
        assert fmt.read_header_only(tmp_path / name) is None, name
    assert fmt.read_header_only(tmp_path / "missing.safetensors") is None


def test_a_truncated_file_names_the_tensor_cut_short(tmp_path):
    path, _, _ = _saved(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[:-100])
    with pytest.raises(fmt.FormatError, match=r"^truncated.safetensors: " + UNREADABLE + r"tensor \S+: "
                                              r"data_offsets \[\d+, \d+\] run past the file's \d+ data bytes "
                                              r"\(truncated\?\)\)$"):
        fmt.load_tensors(bad)


@pytest.mark.parametrize("edit, message", [
    ({"format_version": "3"}, "unsupported format version '3'"),
    ({"format": "something-else"}, "not an SVDQuant natural file"),
    ({"layers": "{not json"}, "bad metadata"),
    ({"quantization": json.dumps({"method": "svdquant", "group_size": 128})}, "unsupported group size 128"),
    ({"layers": json.dumps({"a": {"kind": "w3a3", "in": 128, "out": 128}})}, "layer a: bad description"),
])
def test_bad_metadata(tmp_path, edit, message):
    path, tensors, header = _saved(tmp_path)
    bad = tmp_path / "meta.safetensors"
    _rewrite(bad, tensors, {**header, **edit})
    with pytest.raises(fmt.FormatError, match=f"meta.safetensors: {message}"):
        fmt.load_model(bad)


def test_invalid_model_is_not_written(tmp_path):
    model = _model()
    del model.tensors["a.smooth"]
    path = tmp_path / "out.safetensors"
    with pytest.raises(fmt.FormatError, match="missing tensor a.smooth"):
        fmt.save_model(path, model)
    assert not list(tmp_path.iterdir())
