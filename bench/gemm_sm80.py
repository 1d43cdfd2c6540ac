"""The sm80 W4A4 family on the GPU at the FLUX shapes, side by side with cuBLAS bf16 and torch._int_mm.

    python bench/gemm_sm80.py [--json PATH] [--tokens M ...] [--int4] [--whole-k-only]

Columns (median time per call, CUDA-graph replays over rotating input sets, as bench/gemm.py):
  bf16     cuBLAS `a @ b.t()` in bf16
  int_mm   torch._int_mm on int8 [M, K] x [K, N] (cuBLAS INT8, int32 out): the INT8 tensor cores'
           plain GEMM, no scales
  INT8 variant (mma.sync m16n8k32 on the INT4 codes), rank 32, exact activation scales:
    k1     kernel 1 alone (quantize + low-rank down)
    k2     kernel 2 alone (W4A4 GEMM + low-rank up + bias)
    k1+k2  both through sm80.svdq_linear (what a layer costs), x: bf16 time over it
    k1p    kernel 1 in pow2 mode
    k1r, k1pr, k1+k2r: k1, k1p and k1+k2 of the same layers with a group rotation (issue 15:
           kernel 1 rotates each signed 64-group by numerics.hadamard_rotation)
    k1g    k1 with a random butterfly instead: the coefficient path that rotations other than the
           Hadamard one take
    k1g2   k1 with a random butterfly of two passes (12 stages, as the quantizer's learned rotation)
  INT8 variant on power-of-two layers (pow2 weight scales and activations), rank 32:
    today  kernel 1 in pow2 mode + the per-group kernel 2 (what these layers ran before the whole-K
           kernel), x: bf16 time over it
    k1s8   kernel 1 in pow2_s8 mode (the whole-K kernel's s8 operands)
    wk k2  the whole-K kernel 2 alone (w4a4_gemm_pow2.cu), with stream-K where the host chooses it
    sk     its K-slices per tile of the last wave (sm80.stream_k_plan; 1: no stream-K)
    wk dp  the whole-K kernel 2 with stream-K off (every tile whole); x dp: its time over wk k2
    wk k1+k2  both through sm80.svdq_linear, x: bf16 time over it
    k1s8r, wk k1+k2r: k1s8 and wk k1+k2 of the same layers with the group rotation
  --whole-k-only: bf16 and the whole-K rows only (versions of that kernel side by side).
  --int4: kernel 2 with the INT4 variant (mma.sync m16n8k64, emulated on the H100: correctness-only
  timing, meaningful only on sm_80/86/89).
TOPS count 2*M*N*K.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gemm import FLUX_SHAPES, l2_size, random_layer, shape_inputs, time_calls  # noqa: E402
from record import write_result  # noqa: E402
from svdquant import kernels, numerics  # noqa: E402
from svdquant.families import sm80  # noqa: E402

RANK = 32


def _rotated_ops(layers: list) -> list:
    """The kernels of the layers with numerics.hadamard_rotation as their group rotation (the layers keep it)."""
    rotation = numerics.hadamard_rotation().cuda()
    for layer in layers:
        layer.rotation = rotation
    return [layer.w4a4_kernel() for layer in layers]


def _exact_rows(row: dict, gen, a: list, m: int, n: int, k: int, int4: bool) -> None:
    """int_mm, and the INT8 variant on exact layers (k1, k1p, k2, k1 + k2, the first three rotated too;
    --int4: the INT4 k2)."""
    sets = row["input_sets"]
    a8 = [torch.randint(-8, 8, (m, k), generator=gen, device="cuda", dtype=torch.int8) for _ in range(sets)]
    b8 = [torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8) for _ in range(sets)]
    row["int_mm_ms"] = time_calls([lambda i=i: torch._int_mm(a8[i], b8[i].t()) for i in range(sets)])
    del a8, b8

    layers = [random_layer(n, k, RANK, gen) for _ in range(sets)]
    ops = [layer.w4a4_kernel() for layer in layers]
    inputs = [sm80.kernel1_inputs(op) for op in ops]
    row["k1_ms"] = time_calls([lambda i=i: sm80.act_quant(a[i], *inputs[i]) for i in range(sets)])
    row["k1p_ms"] = time_calls([lambda i=i: sm80.act_quant(a[i], *inputs[i], pow2=True) for i in range(sets)])
    stage1 = [sm80.act_quant(a[i], *inputs[i]) for i in range(sets)]

    def k2(i, mma):
        codes, ascales, lora_act = stage1[i]
        op = ops[i]
        return sm80.w4a4_gemm(codes, ascales, inputs[i][2], op.qweight, op.wscales, lora_act, op.lora_up,
                              op.bias, mma=mma)

    row["k2_int8_ms"] = time_calls([lambda i=i: k2(i, "int8") for i in range(sets)])
    row["k1k2_int8_ms"] = time_calls([lambda i=i: sm80.svdq_linear(a[i], ops[i], mma="int8", pow2_activations=False)
                                      for i in range(sets)])
    ops_rot = _rotated_ops(layers)
    rotation = ops_rot[0].kernel1_rotation()
    row["k1_rot_ms"] = time_calls([lambda i=i: sm80.act_quant(a[i], *inputs[i], rotation=rotation)
                                   for i in range(sets)])
    row["k1p_rot_ms"] = time_calls([lambda i=i: sm80.act_quant(a[i], *inputs[i], pow2=True, rotation=rotation)
                                    for i in range(sets)])
    row["k1k2_int8_rot_ms"] = time_calls([lambda i=i: sm80.svdq_linear(a[i], ops_rot[i], mma="int8",
                                                                       pow2_activations=False) for i in range(sets)])
    angles = torch.rand(2 * numerics.ROTATION_STAGES, numerics.GROUP_SIZE // 2,
                        generator=torch.Generator().manual_seed(1)) * 2 * torch.pi
    for key, passes in (("k1_general", 1), ("k1_general2", 2)):
        general = kernels.kernel1_rotation(numerics.butterfly_rotation(angles[:passes * numerics.ROTATION_STAGES]),
                                           a[0].device)
        row[f"{key}_ms"] = time_calls([lambda i=i, general=general: sm80.act_quant(a[i], *inputs[i], rotation=general)
                                       for i in range(sets)])
    if int4:
        row["k2_int4_ms"] = time_calls([lambda i=i: k2(i, "int4") for i in range(sets)], target_ms=5.0, replays=3)


def _pow2_rows(row: dict, gen, a: list, n: int, k: int, whole_k_only: bool) -> None:
    """Power-of-two layers: today's per-group path (unless whole_k_only), kernel 1 in pow2_s8 mode,
    the whole-K kernel 2 alone and k1 + k2; kernel 1 and k1 + k2 rotated (unless whole_k_only)."""
    sets = row["input_sets"]
    layers = [random_layer(n, k, RANK, gen, pow2=True) for _ in range(sets)]
    ops = [layer.w4a4_kernel() for layer in layers]
    assert all(sm80.runs_whole_k(op, "int8", True) for op in ops)
    inputs = [sm80.kernel1_inputs(op) for op in ops]
    weights = [sm80.pow2_weight_operands(op) for op in ops]
    if not whole_k_only:
        def today(i):
            codes, ascales, lora_act = sm80.act_quant(a[i], *inputs[i], pow2=True)
            op = ops[i]
            return sm80.w4a4_gemm(codes, ascales, inputs[i][2], op.qweight, op.wscales, lora_act, op.lora_up,
                                  op.bias, mma="int8")

        row["k1k2_pow2_today_ms"] = time_calls([lambda i=i: today(i) for i in range(sets)])
        row["k1s8_ms"] = time_calls([lambda i=i: sm80.act_quant(a[i], *inputs[i], pow2=True, int8_operands=True)
                                     for i in range(sets)])
    stage1 = [sm80.act_quant(a[i], *inputs[i], pow2=True, int8_operands=True) for i in range(sets)]

    def whole_k(i, stream_k=None):
        codes, atok, lora_act = stage1[i]
        op = ops[i]
        return sm80.w4a4_gemm_pow2(codes, atok, op.qweight, *weights[i], a[i].dtype, lora_act, op.lora_up, op.bias,
                                   stream_k=stream_k)

    row["k2_whole_k_ms"] = time_calls([lambda i=i: whole_k(i) for i in range(sets)])
    codes = stage1[0][0]
    row["k2_whole_k_splits"] = sm80.whole_k_work_split(codes.shape[0], n, k, codes.device)[2]
    row["k2_whole_k_dp_ms"] = time_calls([lambda i=i: whole_k(i, stream_k=1) for i in range(sets)])
    row["k2_whole_k_stream_k_gain"] = row["k2_whole_k_dp_ms"] / row["k2_whole_k_ms"]
    row["k1k2_whole_k_ms"] = time_calls([lambda i=i: sm80.svdq_linear(a[i], ops[i], mma="int8") for i in range(sets)])
    if not whole_k_only:
        ops_rot = _rotated_ops(layers)
        rotation = ops_rot[0].kernel1_rotation()
        row["k1s8_rot_ms"] = time_calls([lambda i=i: sm80.act_quant(a[i], *inputs[i], pow2=True, int8_operands=True,
                                                                    rotation=rotation) for i in range(sets)])
        row["k1k2_whole_k_rot_ms"] = time_calls([lambda i=i: sm80.svdq_linear(a[i], ops_rot[i], mma="int8")
                                                 for i in range(sets)])


def bench_shape(m: int, n: int, k: int, l2_bytes: int, int4: bool, whole_k_only: bool) -> dict:
    gen, row, a, b = shape_inputs(m, n, k, l2_bytes)
    flops = 2.0 * m * n * k
    del b
    if not whole_k_only:
        _exact_rows(row, gen, a, m, n, k, int4)
    _pow2_rows(row, gen, a, n, k, whole_k_only)
    for key in ("bf16", "int_mm", "k2_int8", "k1k2_int8", "k1k2_pow2_today", "k2_whole_k", "k2_whole_k_dp",
                "k1k2_whole_k", "k2_int4"):
        if key + "_ms" in row:
            row[key + "_tops"] = flops / (row[key + "_ms"] * 1e-3) / 1e12
    for key in ("k1k2_int8", "k1k2_pow2_today", "k1k2_whole_k"):
        if key + "_ms" in row:
            row[key + "_speedup_vs_bf16"] = row["bf16_ms"] / row[key + "_ms"]
    del a
    torch.cuda.empty_cache()
    return row


# (header, row key, scale, format): the printed table, each column shown where its key was measured
COLUMNS = [("bf16 us", "bf16_ms", 1e3, "8.1f"), ("TOPS", "bf16_tops", 1, "5.0f"),
           ("int_mm", "int_mm_ms", 1e3, "7.1f"), ("TOPS", "int_mm_tops", 1, "5.0f"),
           ("k1 us", "k1_ms", 1e3, "6.1f"), ("k1r", "k1_rot_ms", 1e3, "6.1f"), ("k1g", "k1_general_ms", 1e3, "6.1f"),
           ("k1g2", "k1_general2_ms", 1e3, "6.1f"),
           ("k1p us", "k1p_ms", 1e3, "6.1f"), ("k1pr", "k1p_rot_ms", 1e3, "6.1f"),
           ("k2 us", "k2_int8_ms", 1e3, "7.1f"), ("TOPS", "k2_int8_tops", 1, "5.0f"),
           ("k1+k2", "k1k2_int8_ms", 1e3, "7.1f"), ("k1+k2r", "k1k2_int8_rot_ms", 1e3, "7.1f"),
           ("x bf16", "k1k2_int8_speedup_vs_bf16", 1, "6.2f"),
           ("| pow2: today", "k1k2_pow2_today_ms", 1e3, "13.1f"),
           ("x bf16", "k1k2_pow2_today_speedup_vs_bf16", 1, "6.2f"), ("k1s8", "k1s8_ms", 1e3, "6.1f"),
           ("k1s8r", "k1s8_rot_ms", 1e3, "6.1f"),
           ("wk k2", "k2_whole_k_ms", 1e3, "7.1f"), ("TOPS", "k2_whole_k_tops", 1, "5.0f"),
           ("sk", "k2_whole_k_splits", 1, "2.0f"), ("wk dp", "k2_whole_k_dp_ms", 1e3, "7.1f"),
           ("x dp", "k2_whole_k_stream_k_gain", 1, "5.2f"),
           ("wk k1+k2", "k1k2_whole_k_ms", 1e3, "8.1f"), ("wk k1+k2r", "k1k2_whole_k_rot_ms", 1e3, "9.1f"),
           ("x bf16", "k1k2_whole_k_speedup_vs_bf16", 1, "6.2f"),
           ("int4 k2", "k2_int4_ms", 1e3, "8.1f")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "gemm_sm80.json"))
    parser.add_argument("--tokens", type=int, nargs="*", default=[4608])
    parser.add_argument("--int4", action="store_true", help="also time the INT4 variant's kernel 2")
    parser.add_argument("--whole-k-only", action="store_true",
                        help="only bf16 and the whole-K rows (wk k2, wk k1+k2): comparing versions of that kernel")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("bench/gemm_sm80.py needs an sm_80 or newer GPU")
    l2_bytes = l2_size()
    rows, columns = [], None
    for m in args.tokens:
        for n, k in FLUX_SHAPES:
            r = bench_shape(m, n, k, l2_bytes, args.int4, args.whole_k_only)
            rows.append(r)
            if columns is None:
                columns = [c for c in COLUMNS if c[1] in r]
                print(f"{'M':>5} {'N':>6} {'K':>6} | " + " ".join(f"{h:>{f.split('.')[0]}}" for h, _, _, f in columns),
                      flush=True)
            print(f"{m:>5} {n:>6} {k:>6} | " + " ".join(f"{r[key] * scale:{f}}" for _, key, scale, f in columns),
                  flush=True)
    write_result(args.json, rank=RANK, family="sm80",
                 method="CUDA-graph replay of back-to-back calls over rotating input sets (>= 3x L2), median of 10",
                 rows=rows)


if __name__ == "__main__":
    main()
