"""Unpacking nunchaku's tile-packed layer tensors into the natural layout.

Nunchaku stores each tensor in the order its 256x128-tile CUDA kernels read it.
The index formulas below are the inverse of its packers (deepcompressor's nunchaku backend);
they are written as reshape + permute of the flat buffer: a packed tensor is viewed as a
multi-dimensional array whose axes are the digits of the index formula, and the axes are put
back in natural (row, column) order; each function's docstring gives its formula. These are the steps
2-5, 13 and 14 of docs/DESIGN.md#nunchaku-import.

Only layer tensors are handled here; model-level renaming and fusing lives with the model.
"""

from __future__ import annotations

from collections import Counter

import torch

from . import numerics


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _expect(prefix: str, packed: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> None:
    """Each listed tensor present has its shape (None: any size on that axis) and its kind of
    dtype: integers for qweight, else the float dtype most of the layer's tensors have (a 16-bit
    tensor relabelled as the other 16-bit type would unpack to other numbers). ValueError naming
    the file's tensor otherwise."""
    floats = Counter(t.dtype for field, t in packed.items() if field != "qweight")
    layer_dtype = floats.most_common(1)[0][0]
    for field, shape in shapes.items():
        if field not in packed:
            continue
        tensor, key = packed[field], f"{prefix}.{field}"
        wanted = ", ".join("*" if size is None else str(size) for size in shape) + ("," if len(shape) == 1 else "")
        _check(tensor.dim() == len(shape) and all(size in (None, d) for size, d in zip(shape, tensor.shape)),
               f"tensor {key} has shape {tuple(tensor.shape)}, expected ({wanted})")
        if field == "qweight":
            _check(not tensor.is_floating_point(), f"tensor {key} has dtype {tensor.dtype}, expected integers")
        else:
            _check(tensor.dtype == layer_dtype,
                   f"tensor {key} has dtype {tensor.dtype}, unlike the {layer_dtype} of the layer's other tensors")


def _vector_length(packed: dict[str, torch.Tensor], field: str, otherwise: int) -> int:
    # a 1-D tensor's length survives a corruption of its shape that keeps its size
    vector = packed.get(field)
    return vector.shape[0] if vector is not None and vector.dim() == 1 else otherwise


def check_w4a4_layer(prefix: str, packed: dict[str, torch.Tensor]) -> None:
    """The shapes and dtypes of a nunchaku-format W4A4 layer's tensors (as unpack_w4a4_layer reads them)
    agree with each other; ValueError naming the one that does not. N and K come from the bias and
    smooth vectors where they can."""
    qweight = packed["qweight"]
    n = _vector_length(packed, "bias", qweight.shape[0])
    k = _vector_length(packed, "smooth", 2 * qweight.shape[-1])
    rank = packed["lora_down"].shape[-1]
    _expect(prefix, packed, {"bias": (n,), "smooth": (k,), "smooth_orig": (k,), "qweight": (n, k // 2),
                             "wscales": (k // numerics.GROUP_SIZE, n), "lora_down": (k, None), "lora_up": (n, rank)})


def check_w4a16_layer(prefix: str, packed: dict[str, torch.Tensor]) -> None:
    """The same for a nunchaku-format W4A16 layer (as unpack_w4a16_layer reads it): its group tables
    may have padding rows beyond K / 64."""
    n = _vector_length(packed, "bias", packed["wscales"].shape[-1])
    _expect(prefix, packed, {"bias": (n,), "qweight": (n // 4, None), "wscales": (None, n), "wzeros": (None, n)})
    groups = packed["qweight"].shape[1] * 2 // numerics.GROUP_SIZE
    for field in ("wscales", "wzeros"):
        _check(packed[field].shape[0] >= groups, f"tensor {prefix}.{field} has {packed[field].shape[0]} rows, "
                                                 f"needs at least {groups} (K / 64)")


def unpack_w4a4_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K/2] tile-packed -> signed codes int8 [N, K].

    n = 128 nt + 16 np + 8 ns + nl, k = 64 kt + 32 ks + 8 kl + j; code [n, k] is nibble j of
    int32 word (((((nt KT + kt) 8 + np) 8 + nl) 4 + kl) 2 + ns) 2 + ks.
    """
    n, half_k = qweight.shape
    k = half_k * 2
    _check(n % 128 == 0 and k % 64 == 0, f"packed W4A4 weight [{n}, {half_k}] is not padded to 128 x 64 tiles")
    words = qweight.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], dim=-1)
    # axes: nt, kt, np, nl, kl, ns, ks, j  ->  (nt, np, ns, nl), (kt, ks, kl, j)
    codes = nibbles.reshape(n // 128, k // 64, 8, 8, 4, 2, 2, 8).permute(0, 2, 5, 3, 1, 6, 4, 7)
    codes = codes.reshape(n, k).to(torch.int8)
    return torch.where(codes >= 8, codes - 16, codes)


def unpack_w4a4_wscales(wscales: torch.Tensor) -> torch.Tensor:
    """[G, N] tile-permuted -> natural [G, N].

    With n = 128 nt + 16 a + 8 b + 2 c + d, the scale of (n, g) is flat element
    (nt G + g) 128 + 16 a + 4 c + 2 b + d.
    """
    g, n = wscales.shape
    _check(n % 128 == 0, f"packed W4A4 scales [{g}, {n}]: N is not a multiple of 128")
    # axes: nt, g, a, c, b, d  ->  g, (nt, a, b, c, d)
    return wscales.reshape(n // 128, g, 8, 4, 2, 2).permute(1, 0, 2, 4, 3, 5).reshape(g, n).contiguous()


def unpack_w4a4_vector(vec: torch.Tensor) -> torch.Tensor:
    """Per-channel vector (bias, smooth) [N]: element 128 t + 16 a + 8 b + 2 c + d sits at
    128 t + 16 a + 4 c + 2 b + d."""
    (n,) = vec.shape
    _check(n % 128 == 0, f"packed vector of length {n} is not a multiple of 128")
    return vec.reshape(n // 128, 8, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(n).contiguous()


def unpack_lora_down(lora_down: torch.Tensor) -> torch.Tensor:
    """[K, r] packed -> natural [K, r] (x @ lora_down).

    k = 16 kc + 8 p + 2 q + e, j = 16 jc + 8 s + t; flat element
    (((((kc R16 + jc) 8 + t) 4 + q) 2 + s) 2 + p) 2 + e.
    """
    k, r = lora_down.shape
    _check(k % 16 == 0 and r % 16 == 0, f"packed lora_down [{k}, {r}] is not a multiple of 16")
    # axes: kc, jc, t, q, s, p, e  ->  (kc, p, q, e), (jc, s, t)
    v = lora_down.reshape(k // 16, r // 16, 8, 4, 2, 2, 2).permute(0, 5, 3, 6, 1, 4, 2)
    return v.reshape(k, r).contiguous()


def unpack_lora_up(lora_up: torch.Tensor) -> torch.Tensor:
    """[N, r] packed -> natural [N, r].

    n = 16 nc + 8 s + t, j = 16 jc + 8 p + 2 q + e; flat element
    (((((nc R16 + jc) 8 + t) 4 + q) 2 + s) 2 + p) 2 + e.
    """
    n, r = lora_up.shape
    _check(n % 16 == 0 and r % 16 == 0, f"packed lora_up [{n}, {r}] is not a multiple of 16")
    # axes: nc, jc, t, q, s, p, e  ->  (nc, s, t), (jc, p, q, e)
    v = lora_up.reshape(n // 16, r // 16, 8, 4, 2, 2, 2).permute(0, 4, 2, 1, 5, 3, 6)
    return v.reshape(n, r).contiguous()


def unpack_w4a16_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [N/4, K/2] (tinychat/AWQ layout) -> unsigned codes uint8 [N, K].

    Viewed as int16 [N/4, K]; with n = 4 i + t and k = 64 kc + 32 h + 8 m + j, code [n, k]
    is nibble m of int16 element [i, 64 kc + 16 t + 8 h + j].
    """
    quarter_n, half_k = qweight.shape
    n, k = quarter_n * 4, half_k * 2
    _check(k % 64 == 0, f"packed W4A16 weight [{quarter_n}, {half_k}]: K is not a multiple of 64")
    halves = qweight.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    nibbles = torch.stack([(halves >> (4 * m)) & 0xF for m in range(4)], dim=-1)
    # axes: i, kc, t, h, j, m  ->  (i, t), (kc, h, m, j)
    codes = nibbles.reshape(quarter_n, k // 64, 4, 2, 8, 4).permute(0, 2, 1, 3, 5, 4)
    return codes.reshape(n, k).to(torch.uint8)


def unpack_w4a16_groups(table: torch.Tensor, k: int) -> torch.Tensor:
    """wscales / wzeros [G_padded, N] -> [K/64, N]: the packer pads the group count with zero rows."""
    groups = k // numerics.GROUP_SIZE
    _check(table.shape[0] >= groups, f"W4A16 group table has {table.shape[0]} rows, needs {groups}")
    _check(not table[groups:].any(), "W4A16 group table has non-zero padding rows")
    return table[:groups].contiguous()


def unpack_w4a4_layer(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A nunchaku-format W4A4 layer {qweight, wscales, bias, smooth, lora_down, lora_up} -> natural
    {qweight (packed pairs), wscales, smooth, lora_down, lora_up, bias}. Nunchaku's lora_down
    already acts on the unsmoothed input, as the natural one does."""
    codes = unpack_w4a4_qweight(packed["qweight"])
    out = {
        "qweight": numerics.pack_int4(codes),
        "wscales": unpack_w4a4_wscales(packed["wscales"]),
        "smooth": unpack_w4a4_vector(packed["smooth"]),
        "lora_down": unpack_lora_down(packed["lora_down"]),
        "lora_up": unpack_lora_up(packed["lora_up"]),
    }
    if "bias" in packed:
        out["bias"] = unpack_w4a4_vector(packed["bias"])
    return out


def unpack_w4a16_layer(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A nunchaku-format W4A16 layer {qweight, wscales, wzeros, bias} -> natural
    {qweight (unsigned packed pairs), wscales, wzeros, bias} (no row interleave undone here)."""
    codes = unpack_w4a16_qweight(packed["qweight"])
    k = codes.shape[1]
    out = {
        "qweight": numerics.pack_int4(codes),
        "wscales": unpack_w4a16_groups(packed["wscales"], k),
        "wzeros": unpack_w4a16_groups(packed["wzeros"], k),
    }
    if "bias" in packed:
        out["bias"] = packed["bias"]
    return out
