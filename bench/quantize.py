"""Quantizing a full-size FLUX.1-dev checkpoint: wall time, peak RSS and peak GPU memory.

    python bench/quantize.py [--device cuda] [--dir DIR] [--out bench/results/quantize_h100.json]
    python bench/quantize.py --tiny --device cpu          # the same steps on the tiny test model

Writes a random-weight bf16 FLUX.1-dev transformer (19 + 38 blocks, 11.9 billion parameters,
22.2 GiB; drawn tensor by tensor on the device and streamed to DIR, default a temporary folder),
then runs `python -m svdquant quantize`'s engine (flux.quantizer.quantize_checkpoint) on it, each
configuration in a process of its own so that its peak RSS (ru_maxrss, which counts the pages of
the block being read from the memory-mapped checkpoint) and peak GPU memory (torch's
max_memory_reserved) are its own. Configurations (--configs): stand-ins (random stand-in calibration
inputs, the default recipe), prompts (prompt-style text embeddings of 512 tokens, T5-like with a few
massive channels, as the node's calibration_prompts give), learned (stand-ins with the learned
rotation and the learned smoothing: the lowest-error recipe). The checkpoint is read from the page
cache (it was just written).
"""

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import write_result  # noqa: E402
from svdquant import flux  # noqa: E402

PROMPT_TOKENS, PROMPTS = 512, 2


def write_random_checkpoint(path: Path, cfg: flux.arch.FluxConfig, device: str) -> float:
    """A bf16 checkpoint of the architecture with N(0, 1/K) weights, small biases and unit norm
    scales, drawn on `device` one tensor at a time and streamed to disk. Returns the seconds taken."""
    start = time.perf_counter()
    shapes = flux.arch.dense_shapes(cfg)
    writer = flux.quantizer.StreamingWriter(path, sum(len(key) + 128 for key in shapes) + 4096)
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        for key, shape in shapes.items():
            if key.endswith(".scale"):
                t = torch.ones(shape, device=device)
            elif key.endswith(".bias"):
                t = torch.randn(shape, device=device, generator=gen) * 0.02
            else:
                t = torch.randn(shape, device=device, generator=gen) / shape[1] ** 0.5
            writer.write(key, t.to(torch.bfloat16))
        writer.finish({})
    except BaseException:
        writer.discard()
        raise
    return time.perf_counter() - start


def prompt_style_embeddings(cfg: flux.arch.FluxConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Text embeddings shaped like real prompts': T5-XXL-like context (small values, a few massive
    channels) of PROMPT_TOKENS tokens and a CLIP-L-like pooled vector."""
    gen = torch.Generator().manual_seed(7)
    prompts = []
    for _ in range(PROMPTS):
        context = torch.randn(PROMPT_TOKENS, cfg.context_in_dim, generator=gen) * 0.15
        context[:, [131, 2049, 3001]] *= 400.0
        prompts.append((context, torch.randn(cfg.vec_in_dim, generator=gen)))
    return prompts


def quantize_once(source: str, target: str, device: str, prompts: bool, calls: int, learned: bool) -> dict:
    """One quantization in this process; its wall time, peak RSS, peak GPU memory and quality."""
    reports: list[str] = []
    cfg = flux.quantizer.checkpoint_config(source)
    done: list[str] = []

    def layer_done(name: str) -> None:  # progress on stderr, so that a run stopped early still says how far it got
        done.append(name)
        if len(done) == 1 or len(done) % 50 == 0:
            print(f"  {len(done)} layers at {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    start = time.perf_counter()
    result = flux.quantizer.quantize_checkpoint(source, target, calibration_calls=calls, device=device,
                                                progress=False, report=reports.append, on_layer=layer_done,
                                                prompts=prompt_style_embeddings(cfg) if prompts else None,
                                                rotation="learned" if learned else "hadamard",
                                                learned_smoothing=learned)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"calibration": f"{PROMPTS} prompt-style embeddings of {PROMPT_TOKENS} tokens" if prompts
            else "random stand-ins", "recipe": "learned rotation + learned smoothing" if learned else "default",
            "calibration_calls": calls, "seconds": round(seconds, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "peak_gpu_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device.startswith("cuda") else None,
            "layers": len(result.layers), "output_gib": round(Path(target).stat().st_size / 2**30, 3),
            "held_out_error_mean": result.quality["mean"], "worst": result.quality["worst"][:3], "plan": reports[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", help="where the checkpoint and outputs go (default: a temporary folder)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test architecture instead of full size")
    parser.add_argument("--blocks", nargs=2, type=int, metavar=("DOUBLE", "SINGLE"),
                        help="FLUX.1-dev's width with this many double and single blocks (default 19 38)")
    parser.add_argument("--calls", type=int, default=4, help="calibration calls")
    parser.add_argument("--configs", default="stand-ins,prompts",
                        help="which of stand-ins, prompts, learned to run, in order")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "quantize_h100.json"))
    parser.add_argument("--one", nargs=2, metavar=("SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--prompts", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--learned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one quantization, its measurements as the last line
        print(json.dumps(quantize_once(*args.one, args.device, args.prompts, args.calls, args.learned)))
        return

    cfg = flux.synthetic.tiny_flux_config(guidance_embed=True) if args.tiny else flux.arch.FluxConfig()
    if args.blocks:
        cfg = dataclasses.replace(cfg, depth=args.blocks[0], depth_single_blocks=args.blocks[1])
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        folder = Path(scratch)
        source = folder / "flux1-dev-random.safetensors"
        gen_device = args.device if args.device.startswith("cuda") else "cpu"
        written = write_random_checkpoint(source, cfg, gen_device)
        size = source.stat().st_size
        print(f"wrote {source.name}: {size / 2**30:.2f} GiB in {written:.1f} s; free on disk "
              f"{shutil.disk_usage(folder).free / 2**30:.1f} GiB", flush=True)
        runs = []
        for config in args.configs.split(","):
            target = folder / "out.safetensors"
            command = [sys.executable, __file__, "--one", str(source), str(target), "--device", args.device,
                       "--calls", str(args.calls)] + {"prompts": ["--prompts"], "learned": ["--learned"]}.get(config, [])
            print(f"{config}:", flush=True)
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if done.returncode:
                print(done.stdout)
                raise SystemExit(f"{config}: exit code {done.returncode}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            target.unlink()
            print(json.dumps(runs[-1]), flush=True)
            record(args, cfg, size, written, runs)  # after each run, so that a stopped benchmark keeps what it measured

    print(f"\n{'calibration':<44} {'recipe':<36} {'wall s':>7} {'peak RSS GiB':>13} {'peak GPU GiB':>13} "
          f"{'held-out err':>13}")
    for run in runs:
        gpu = "-" if run["peak_gpu_gib"] is None else f"{run['peak_gpu_gib']:.2f}"
        print(f"{run['calibration']:<44} {run['recipe']:<36} {run['seconds']:>7.1f} {run['peak_rss_gib']:>13.2f} "
              f"{gpu:>13} {run['held_out_error_mean']:>13.4f}")


def record(args, cfg: flux.arch.FluxConfig, size: int, written: float, runs: list[dict]) -> None:
    write_result(args.out, what="quantize_checkpoint on a random-weight bf16 FLUX.1-dev-architecture checkpoint "
                 "(read from the page cache), one process per run", device_arg=args.device,
                 model={"double_blocks": cfg.depth, "single_blocks": cfg.depth_single_blocks,
                        "hidden_size": cfg.hidden_size, "checkpoint_gib": round(size / 2**30, 2),
                        "checkpoint_write_seconds": round(written, 1)}, runs=runs)


if __name__ == "__main__":
    main()
