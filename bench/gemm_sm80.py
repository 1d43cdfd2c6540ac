"""The sm80 W4A4 family on the GPU at the FLUX shapes, side by side with cuBLAS bf16 and torch._int_mm.

    python bench/gemm_sm80.py [--json PATH] [--tokens M ...] [--int4]

Columns (median time per call, CUDA-graph replays over rotating input sets, as bench/gemm.py):
  bf16     cuBLAS `a @ b.t()` in bf16
  int_mm   torch._int_mm on int8 [M, K] x [K, N] (cuBLAS INT8, int32 out): the INT8 tensor cores'
           plain GEMM, no scales
  INT8 variant (mma.sync m16n8k32 on the INT4 codes), rank 32, exact activation scales:
    k1     kernel 1 alone (quantize + low-rank down)
    k2     kernel 2 alone (W4A4 GEMM + low-rank up + bias)
    k1+k2  both through sm80.svdq_linear (what a layer costs), x: bf16 time over it
    k1p    kernel 1 in pow2 mode
  INT8 variant on power-of-two layers (pow2 weight scales and activations), rank 32:
    today  kernel 1 in pow2 mode + the per-group kernel 2 (what these layers ran before the whole-K
           kernel), x: bf16 time over it
    k1s8   kernel 1 in pow2_s8 mode (the whole-K kernel's s8 operands)
    wk k2  the whole-K kernel 2 alone (w4a4_gemm_pow2.cu)
    wk k1+k2  both through sm80.svdq_linear, x: bf16 time over it
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
from svdquant.families import sm80  # noqa: E402

RANK = 32


def bench_shape(m: int, n: int, k: int, l2_bytes: int, int4: bool) -> dict:
    gen, row, a, b = shape_inputs(m, n, k, l2_bytes)
    sets, flops = row["input_sets"], 2.0 * m * n * k
    del b
    a8 = [torch.randint(-8, 8, (m, k), generator=gen, device="cuda", dtype=torch.int8) for _ in range(sets)]
    b8 = [torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8) for _ in range(sets)]
    row["int_mm_ms"] = time_calls([lambda i=i: torch._int_mm(a8[i], b8[i].t()) for i in range(sets)])
    del a8, b8

    ops = [random_layer(n, k, RANK, gen).w4a4_kernel() for _ in range(sets)]
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
    if int4:
        row["k2_int4_ms"] = time_calls([lambda i=i: k2(i, "int4") for i in range(sets)], target_ms=5.0, replays=3)
    del ops, inputs, stage1

    # power-of-two layers: today's per-group path against the whole-K kernel 2
    ops = [random_layer(n, k, RANK, gen, pow2=True).w4a4_kernel() for _ in range(sets)]
    inputs = [sm80.kernel1_inputs(op) for op in ops]
    weights = [sm80.pow2_weight_operands(op) for op in ops]

    def today(i):
        codes, ascales, lora_act = sm80.act_quant(a[i], *inputs[i], pow2=True)
        op = ops[i]
        return sm80.w4a4_gemm(codes, ascales, inputs[i][2], op.qweight, op.wscales, lora_act, op.lora_up, op.bias,
                              mma="int8")

    row["k1k2_pow2_today_ms"] = time_calls([lambda i=i: today(i) for i in range(sets)])
    row["k1s8_ms"] = time_calls([lambda i=i: sm80.act_quant(a[i], *inputs[i], pow2=True, s8=True)
                                 for i in range(sets)])
    stage1 = [sm80.act_quant(a[i], *inputs[i], pow2=True, s8=True) for i in range(sets)]

    def whole_k(i):
        codes, atok, lora_act = stage1[i]
        op = ops[i]
        return sm80.w4a4_gemm_pow2(codes, atok, op.qweight, *weights[i], a[i].dtype, lora_act, op.lora_up, op.bias)

    row["k2_whole_k_ms"] = time_calls([lambda i=i: whole_k(i) for i in range(sets)])
    assert all(sm80.runs_whole_k(op, "int8", True) for op in ops)
    row["k1k2_whole_k_ms"] = time_calls([lambda i=i: sm80.svdq_linear(a[i], ops[i], mma="int8") for i in range(sets)])
    for key in ("bf16", "int_mm", "k2_int8", "k1k2_int8", "k1k2_pow2_today", "k2_whole_k", "k1k2_whole_k") + (
            ("k2_int4",) if int4 else ()):
        row[key + "_tops"] = flops / (row[key + "_ms"] * 1e-3) / 1e12
    for key in ("k1k2_int8", "k1k2_pow2_today", "k1k2_whole_k"):
        row[key + "_speedup_vs_bf16"] = row["bf16_ms"] / row[key + "_ms"]
    del a, ops, inputs, weights, stage1
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "gemm_sm80.json"))
    parser.add_argument("--tokens", type=int, nargs="*", default=[4608])
    parser.add_argument("--int4", action="store_true", help="also time the INT4 variant's kernel 2")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        sys.exit("bench/gemm_sm80.py needs an sm_80 or newer GPU")
    l2_bytes = l2_size()
    rows = []
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'bf16 us':>8} {'TOPS':>5} | {'int_mm':>7} {'TOPS':>5} | {'k1 us':>6} "
          f"{'k1p us':>6} {'k2 us':>7} {'TOPS':>5} {'k1+k2':>7} {'TOPS':>5} {'x bf16':>6} | pow2: {'today':>7} "
          f"{'x bf16':>6} {'k1s8':>6} {'wk k2':>7} {'TOPS':>5} {'wk k1+k2':>8} {'x bf16':>6}"
          + (f" | {'int4 k2':>8}" if args.int4 else ""), flush=True)
    for m in args.tokens:
        for n, k in FLUX_SHAPES:
            r = bench_shape(m, n, k, l2_bytes, args.int4)
            rows.append(r)
            print(f"{m:>5} {n:>6} {k:>6} | {r['bf16_ms'] * 1e3:>8.1f} {r['bf16_tops']:>5.0f} | "
                  f"{r['int_mm_ms'] * 1e3:>7.1f} {r['int_mm_tops']:>5.0f} | {r['k1_ms'] * 1e3:>6.1f} "
                  f"{r['k1p_ms'] * 1e3:>6.1f} {r['k2_int8_ms'] * 1e3:>7.1f} {r['k2_int8_tops']:>5.0f} "
                  f"{r['k1k2_int8_ms'] * 1e3:>7.1f} {r['k1k2_int8_tops']:>5.0f} {r['k1k2_int8_speedup_vs_bf16']:>6.2f} | "
                  f"      {r['k1k2_pow2_today_ms'] * 1e3:>7.1f} {r['k1k2_pow2_today_speedup_vs_bf16']:>6.2f} "
                  f"{r['k1s8_ms'] * 1e3:>6.1f} {r['k2_whole_k_ms'] * 1e3:>7.1f} {r['k2_whole_k_tops']:>5.0f} "
                  f"{r['k1k2_whole_k_ms'] * 1e3:>8.1f} {r['k1k2_whole_k_speedup_vs_bf16']:>6.2f}"
                  + (f" | {r['k2_int4_ms'] * 1e3:>8.1f}" if args.int4 else ""), flush=True)
    write_result(args.json, rank=RANK, family="sm80",
                 method="CUDA-graph replay of back-to-back calls over rotating input sets (>= 3x L2), median of 10",
                 rows=rows)


if __name__ == "__main__":
    main()
