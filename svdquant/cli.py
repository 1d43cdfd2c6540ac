"""Command line: python -m svdquant {demo, info}."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import format as fmt
from . import kernels


def cmd_info(args) -> int:
    print(json.dumps({"extension": kernels.extension_info()}, indent=2))
    for path in args.files:
        model = fmt.load_model(path)
        kinds: dict[str, int] = {}
        for desc in model.layers.values():
            kinds[desc["kind"]] = kinds.get(desc["kind"], 0) + 1
        size = sum(t.numel() * t.element_size() for t in model.tensors.values())
        print(f"{path}: {model.model_type}, {len(model.tensors)} tensors, {size / 2**20:.1f} MiB, layers {kinds}")
        print(f"  quantization {json.dumps(model.quantization)}")
    return 0


def cmd_demo(args) -> int:
    from . import synthetic

    print(f"synthetic FLUX-shaped layer: N={args.n} K={args.k}, {args.tokens} tokens, 8 outlier channels")
    start = time.perf_counter()
    x, weight, bias = synthetic.outlier_layer(args.n, args.k, args.tokens)
    errors = synthetic.layer_fidelity(x, weight, bias, rank=args.rank)
    print(f"{'scheme':<16} relative output error")
    for name, err in errors.items():
        print(f"{name:<16} {err:.4f}")
    print(f"quantized 3 ways and evaluated in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svdquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a synthetic outlier layer and print the fidelity of 4-bit schemes")
    demo.add_argument("--n", type=int, default=3072)
    demo.add_argument("--k", type=int, default=3072)
    demo.add_argument("--tokens", type=int, default=256)
    demo.add_argument("--rank", type=int, default=32)
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="describe SVDQuant model files and the compiled extension")
    info.add_argument("files", nargs="*")
    info.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except fmt.FormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
