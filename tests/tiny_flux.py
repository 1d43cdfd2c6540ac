"""Shared test material: tiny FLUX models, made once per test session."""

import functools
from pathlib import Path

from svdquant import flux

REPO = Path(__file__).resolve().parents[1]
# a coarser smoothing search than the default 11 exponents keeps the suite fast on 2 cores
TEST_ALPHAS = (0.25, 0.5, 0.75)


@functools.lru_cache(maxsize=None)
def bf16_model(guidance_embed: bool):
    """(config, bf16 state dict) of the tiny FLUX model; dev when guidance_embed, else schnell."""
    cfg = flux.synthetic.tiny_flux_config(guidance_embed=guidance_embed)
    return cfg, flux.synthetic.tiny_flux_state_dict(cfg)


@functools.lru_cache(maxsize=None)
def quantized_model(guidance_embed: bool, rank: int = 32, smooth: bool = True, pow2_scales: bool = False,
                    rotation: str = "hadamard"):
    cfg, tensors = bf16_model(guidance_embed)
    return flux.quantizer.quantize_flux(tensors, cfg, flux.quantizer.calibration_inputs(cfg), rank=rank,
                                        smooth=smooth, alphas=TEST_ALPHAS, progress=False, pow2_scales=pow2_scales,
                                        rotation=rotation)


def eager_and_compiled(model, args, backend: str = "inductor"):
    """model(*args) run eagerly and through torch.compile (from a clean dynamo state), the reasons for
    which dynamo broke its graphs, and how many quantized layers its graphs call (svdquant's operator)."""
    import torch
    import torch._dynamo.utils

    from svdquant import linear

    operator = getattr(torch.ops, linear.OPERATOR.split("::")[0]).quantized_linear.default
    calls = []

    def counting(graph, example_inputs):
        calls.extend(node for node in graph.graph.nodes if node.target is operator)
        return torch._dynamo.lookup_backend(backend)(graph, example_inputs)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        eager = model(*args)
        compiled = torch.compile(model, backend=counting)(*args)
    return eager, compiled, list(torch._dynamo.utils.counters["graph_break"]), len(calls)

