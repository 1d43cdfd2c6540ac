"""The input of FLUX's single-block linear2 on the GPU (issue 17 item 1): the GELU of linear1's MLP columns and their
concatenation with the attention output made by PyTorch before the layer, against kernel 1 reading the attention
output and the GELU columns where they lie (kernels.Concat; the GELU moved into linear1's kernel 2), side by side.

    python bench/single_block_concat.py [--json PATH]

Rows: linear2 of a single block, K = 3072 + 12288 (attention | MLP), N = 3072, M = 4608 (1024x1024) and 1024 (512x512);
sm90 fast path (pow2 mode, s8 operands) and exact path. Columns (us per call, CUDA-graph replays over rotating input
sets, as bench/gemm.py):
  gelu+cat  PyTorch's GELU of the strided MLP columns of linear1's output and torch.cat (ComfyUI's eager single block)
  k1        kernel 1 on that contiguous concatenation
  k1p       kernel 1 on the two parts, the MLP columns read from linear1's output
  saved     gelu+cat + k1 - k1p
  l1 / l1g  linear1 (N = 21504) without / with the GELU in kernel 2's epilogue from channel 9216 (what the move costs)
  layer / parts  gelu+cat then linear2 / linear2 on kernels.Concat
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import input_sets, l2_size, random_layer, time_calls  # noqa: E402
from record import write_result  # noqa: E402

from svdquant import kernels  # noqa: E402
from svdquant.families import sm90  # noqa: E402

HIDDEN, MLP = 3072, 12288
LINEAR1 = 3 * HIDDEN + MLP


def bench(m: int, fast: bool, l2_bytes: int) -> dict:
    k = HIDDEN + MLP
    gen = torch.Generator(device="cuda").manual_seed(m + fast)
    linear1 = random_layer(LINEAR1, HIDDEN, 32, gen, pow2=fast)
    linear2 = random_layer(HIDDEN, k, 32, gen, pow2=fast)
    kernel1, kernel2 = linear1.w4a4_kernel(), linear2.w4a4_kernel()
    linear1.gelu_from = 3 * HIDDEN
    kernel1_gelu = linear1.w4a4_kernel()
    sets = input_sets(m, HIDDEN, k, l2_bytes)
    x = [torch.randn(m, HIDDEN, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    attention = [torch.randn(m, HIDDEN, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    out1 = [kernel1(x[i]) for i in range(sets)]  # linear1's output: qkv | MLP columns
    out1_gelu = [kernel1_gelu(x[i]) for i in range(sets)]

    def gelu_cat(i):
        return torch.cat((attention[i], torch.nn.functional.gelu(out1[i][:, 3 * HIDDEN:], approximate="tanh")), 1)

    def concat(i):
        return kernels.Concat(attention[i], out1_gelu[i][:, 3 * HIDDEN:])

    inputs = sm90.kernel1_inputs(kernel2)
    rotation = kernel2.kernel1_rotation()
    whole = [gelu_cat(i) for i in range(sets)]
    row = {"M": m, "K": k, "N": HIDDEN, "path": "fast" if fast else "exact", "input_sets": sets}
    row["gelu_cat_ms"] = time_calls([lambda i=i: gelu_cat(i) for i in range(sets)])
    row["k1_ms"] = time_calls([lambda i=i: sm90.act_quant(whole[i], *inputs, fast, fast, rotation)
                               for i in range(sets)])
    row["k1_parts_ms"] = time_calls([lambda i=i: sm90.act_quant(attention[i], *inputs, fast, fast, rotation,
                                                                x2=out1_gelu[i][:, 3 * HIDDEN:]) for i in range(sets)])
    row["linear1_ms"] = time_calls([lambda i=i: kernel1(x[i]) for i in range(sets)])
    row["linear1_gelu_ms"] = time_calls([lambda i=i: kernel1_gelu(x[i]) for i in range(sets)])
    row["layer_ms"] = time_calls([lambda i=i: kernel2(gelu_cat(i)) for i in range(sets)])
    row["parts_ms"] = time_calls([lambda i=i: kernel2(concat(i)) for i in range(sets)])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"),
                                                       "single_block_concat.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench/single_block_concat.py needs an sm_90 GPU")
    l2_bytes, rows = l2_size(), []
    print(f"{'path':>5} {'M':>5} | {'gelu+cat':>8} {'k1':>6} {'k1p':>6} {'saved':>6} | {'l1':>6} {'l1g':>6} | "
          f"{'layer':>7} {'parts':>7} {'x':>5}   (us)", flush=True)
    with torch.no_grad():
        for fast in (True, False):
            for m in (4608, 1024):
                r = bench(m, fast, l2_bytes)
                rows.append(r)
                us = {key: value * 1e3 for key, value in r.items() if key.endswith("_ms")}
                print(f"{r['path']:>5} {m:>5} | {us['gelu_cat_ms']:>8.1f} {us['k1_ms']:>6.1f} "
                      f"{us['k1_parts_ms']:>6.1f} {us['gelu_cat_ms'] + us['k1_ms'] - us['k1_parts_ms']:>6.1f} | "
                      f"{us['linear1_ms']:>6.1f} "
                      f"{us['linear1_gelu_ms']:>6.1f} | {us['layer_ms']:>7.1f} {us['parts_ms']:>7.1f} "
                      f"{r['layer_ms'] / r['parts_ms']:>5.2f}", flush=True)
    write_result(args.json, rank=32, method="CUDA-graph replay over rotating input sets (>= 3x L2), median of 10",
                 rows=rows)


if __name__ == "__main__":
    main()
