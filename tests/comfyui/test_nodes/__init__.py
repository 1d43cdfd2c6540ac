"""A test-only ComfyUI node pack (never installed with the SVDQuant pack): FLUX-shaped conditioning
without text encoders, which no stock node makes and a tiny model does not need."""

import torch
from comfy_api.latest import ComfyExtension, io


class SVDQuantTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SVDQuantTestConditioning",
            display_name="SVDQuant Test Conditioning",
            category="SVDQuant/testing",
            description="Random T5-like (4096 wide) and CLIP-like pooled (768) embeddings.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                    io.Int.Input("tokens", default=8, min=1, max=512),
                    io.Boolean.Input("pooled", default=True, optional=True)],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, seed: int, tokens: int, pooled: bool = True) -> io.NodeOutput:
        gen = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, 4096, generator=gen)
        extra = {"pooled_output": torch.randn(1, 768, generator=gen)} if pooled else {}
        return io.NodeOutput([[context, extra]])


class TestNodes(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SVDQuantTestConditioning]


async def comfy_entrypoint() -> TestNodes:
    return TestNodes()
