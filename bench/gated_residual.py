"""FLUX's gated residual streams on the GPU (issue 17 item 1's glue): `residual + gate * y` after a W4A4 layer made by
PyTorch's two ops, against kernel 2 writing it in its epilogue (kernels.GatedResidual), side by side.

    python bench/gated_residual.py [--kernels sm80-int8] [--json PATH]

Rows: the layers whose output FLUX gates into a residual, at 1024x1024: a single block's linear2 (M = 4608,
K = 15360), a double block's attention projection (K = 3072) and MLP output layer (K = 12288) in the image stream
(M = 4096) and the text stream (M = 512); N = 3072, rank 32, fast path (power-of-two file) and exact path, on the
GPU's own kernels or those --kernels forces (kernels.W4A4_KERNELS: the sm80 family runs on any sm_80+ GPU).
Columns (us per call, CUDA-graph replays over rotating input sets, as bench/gemm.py):
  layer     the layer alone (kernels 1 and 2)
  +ops      the layer, then PyTorch's `residual + gate * y` (ComfyUI's eager block)
  fused     the layer with the gated residual in kernel 2's epilogue, into a new tensor
  in place  the same into the residual itself (`residual += gate * y`)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm import input_sets, l2_size, random_layer, time_calls  # noqa: E402
from record import write_result  # noqa: E402

from svdquant import kernels  # noqa: E402

N = 3072
ROWS = [("single linear2", 4608, 15360), ("image proj", 4096, 3072), ("image mlp.2", 4096, 12288),
        ("text proj", 512, 3072), ("text mlp.2", 512, 12288)]


def bench(name: str, m: int, k: int, fast: bool, l2_bytes: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m + k + fast)
    kernel = random_layer(N, k, 32, gen, pow2=fast).w4a4_kernel()
    sets = input_sets(m, N, k, l2_bytes)
    x = [torch.randn(m, k, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    residual = [torch.randn(m, N, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    gate = [torch.randn(1, N, generator=gen, device="cuda").bfloat16() for _ in range(sets)]
    gated = [kernels.GatedResidual(residual[i], gate[i]) for i in range(sets)]
    row = {"layer": name, "M": m, "N": N, "K": k, "path": "fast" if fast else "exact", "input_sets": sets}
    row["layer_ms"] = time_calls([lambda i=i: kernel(x[i]) for i in range(sets)])
    row["ops_ms"] = time_calls([lambda i=i: residual[i] + gate[i] * kernel(x[i]) for i in range(sets)])
    row["fused_ms"] = time_calls([lambda i=i: kernel(x[i], residual=gated[i]) for i in range(sets)])
    # in place: each replay adds into its residual again (the time does not depend on the values)
    row["in_place_ms"] = time_calls([lambda i=i: kernel(x[i], residual=gated[i], out=residual[i])
                                     for i in range(sets)])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", choices=sorted(kernels.W4A4_KERNELS), help="force these W4A4 kernels")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "gated_residual.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gated_residual.py needs a GPU")
    with contextlib.ExitStack() as stack:
        if args.kernels:
            stack.enter_context(kernels.forced_family(args.kernels))
        run(args)


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    chosen = kernels.w4a4_kernels_on(device)
    if chosen is None or not kernels.residual_on(device):
        sys.exit(f"no W4A4 kernels with the gated-residual epilogue on this GPU ({chosen or 'none'})")
    l2_bytes, rows = l2_size(), []
    print(f"kernels: {chosen}", flush=True)
    print(f"{'path':>5} {'layer':>15} {'M':>5} {'K':>6} | {'layer':>7} {'+ops':>7} {'fused':>7} {'in place':>8} "
          f"{'saved':>6}   (us)", flush=True)
    with torch.no_grad():
        for fast in (True, False):
            for name, m, k in ROWS:
                r = bench(name, m, k, fast, l2_bytes)
                rows.append(r)
                us = {key: value * 1e3 for key, value in r.items() if key.endswith("_ms")}
                print(f"{r['path']:>5} {name:>15} {m:>5} {k:>6} | {us['layer_ms']:>7.1f} {us['ops_ms']:>7.1f} "
                      f"{us['fused_ms']:>7.1f} {us['in_place_ms']:>8.1f} {us['ops_ms'] - us['fused_ms']:>6.1f}",
                      flush=True)
    write_result(args.json, kernels=chosen, rank=32, method="CUDA-graph replay over rotating input sets (>= 3x L2), median of 10",
                 rows=rows)


if __name__ == "__main__":
    main()
