"""FP8 execution (docs/DESIGN.md#fp8-execution) per layer at the FLUX shapes, on an H100, side by side
with cuBLAS bf16 and the 4-bit kernels on the same exact-scale layer (a nunchaku-format file's).

    python bench/fp8_execution.py [--json PATH] [--tokens M ...]

Columns (median time per call, as bench/gemm.py times them: CUDA-graph replays over input sets that
do not fit L2), rank 32, bf16:
  bf16        cuBLAS `a @ b.t()`
  exact       the exact 4-bit kernels, k1 + k2 (sm90.svdq_linear), x: bf16 time over it
  fast        the fast 4-bit kernels (power-of-two weight and activation scales: a file made that way)
  quant       FP8 execution's input quantization alone (csrc/fp8/act_quant_fp8.cu)
  gemm        cuBLAS FP8 GEMM alone (torch._scaled_mm, row-wise scales, bias)
  fp8 layer   the whole FP8-execution layer through W4A4Kernel (quant + GEMM), x: bf16 time over it
  gelu        the same layer with a GELU on all of its output channels (the MLP input layers')
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gemm import FLUX_SHAPES, l2_size, random_layer, shape_inputs, time_calls  # noqa: E402
from record import write_result  # noqa: E402
from svdquant.families import fp8, sm90  # noqa: E402

RANK = 32


def bench_shape(m: int, n: int, k: int, l2_bytes: int) -> dict:
    gen, row, a, b = shape_inputs(m, n, k, l2_bytes)
    sets = row["input_sets"]
    del b
    layers = [random_layer(n, k, RANK, gen) for _ in range(sets)]
    exact = [layer.w4a4_kernel() for layer in layers]
    row["exact_ms"] = time_calls([lambda i=i: sm90.svdq_linear(a[i], exact[i]) for i in range(sets)])
    fast = [random_layer(n, k, RANK, gen, pow2=True) for _ in range(sets)]
    for layer in fast:
        layer.pow2_activations = True
    fast_ops = [layer.w4a4_kernel() for layer in fast]
    row["fast_ms"] = time_calls([lambda i=i: sm90.svdq_linear(a[i], fast_ops[i]) for i in range(sets)])
    del fast, fast_ops
    for layer in layers:
        layer.fp8_execution = True
    ops = [layer.w4a4_kernel() for layer in layers]
    assert all(op.fallback_reason(a[0]) == "" for op in ops)
    weights = [fp8.weights(op) for op in ops]
    quantized = [fp8.act_quant(a[i]) for i in range(sets)]
    row["quant_ms"] = time_calls([lambda i=i: fp8.act_quant(a[i]) for i in range(sets)])
    row["gemm_ms"] = time_calls([lambda i=i: torch._scaled_mm(
        quantized[i][0], weights[i][0].t(), scale_a=quantized[i][1], scale_b=weights[i][1], bias=weights[i][2],
        out_dtype=torch.bfloat16) for i in range(sets)])
    row["fp8_layer_ms"] = time_calls([lambda i=i: ops[i](a[i]) for i in range(sets)])
    for layer in layers:
        layer.gelu_from = 0
    gelu_ops = [layer.w4a4_kernel() for layer in layers]
    row["fp8_layer_gelu_ms"] = time_calls([lambda i=i: gelu_ops[i](a[i]) for i in range(sets)])
    for key in ("exact", "fast", "fp8_layer"):
        row[key + "_speedup_vs_bf16"] = row["bf16_ms"] / row[key + "_ms"]
    del a, layers, exact, ops, gelu_ops, weights, quantized
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "fp8_execution.json"))
    parser.add_argument("--tokens", type=int, nargs="*", default=[4608])
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench/fp8_execution.py needs an sm_90 GPU")
    l2_bytes = l2_size()
    rows = []
    print(f"{'M':>5} {'N':>6} {'K':>6} | {'bf16 us':>8} | {'exact':>7} {'x':>5} | {'fast':>7} {'x':>5} | "
          f"{'quant':>6} {'gemm':>7} {'fp8 layer':>9} {'x':>5} {'gelu':>7}", flush=True)
    for m in args.tokens:
        for n, k in FLUX_SHAPES:
            r = bench_shape(m, n, k, l2_bytes)
            rows.append(r)
            print(f"{m:>5} {n:>6} {k:>6} | {r['bf16_ms'] * 1e3:>8.1f} | {r['exact_ms'] * 1e3:>7.1f} "
                  f"{r['exact_speedup_vs_bf16']:>5.2f} | {r['fast_ms'] * 1e3:>7.1f} {r['fast_speedup_vs_bf16']:>5.2f} | "
                  f"{r['quant_ms'] * 1e3:>6.1f} {r['gemm_ms'] * 1e3:>7.1f} {r['fp8_layer_ms'] * 1e3:>9.1f} "
                  f"{r['fp8_layer_speedup_vs_bf16']:>5.2f} {r['fp8_layer_gelu_ms'] * 1e3:>7.1f}", flush=True)
    write_result(args.json, what="FP8 execution per layer against cuBLAS bf16 and the 4-bit kernels "
                 "(bench/fp8_execution.py)", rank=RANK, rows=rows)


if __name__ == "__main__":
    main()
