"""generator.compile: the training generator's UNet and VAE under torch.compile agree with eager.

The test compiles with the aot_eager backend (dynamo capture + AOTAutograd's forward/backward graphs, no code
generation) to stay bounded on CPU; inductor's compile time and speed are measured by benchmarks/bench_release.py.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from helpers import TINY, compose_config
from osediff_lab.models.components import build_components
from osediff_lab.models.osediff import build_osediff


def generator(compile_backend: str | None):
    cfg = compose_config(TINY)
    with open_dict(cfg):
        cfg.generator.compile = compile_backend is not None
        cfg.generator.compile_backend = compile_backend or "inductor"
    torch.manual_seed(0)
    return build_osediff(build_components(cfg.model), cfg.generator).generator


def step(gen, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out, z = gen(x, emb, torch.Generator().manual_seed(0))
    (out.square().mean() + z.square().mean()).backward()
    return out.detach(), [p.grad for _, p in sorted(gen.named_parameters()) if p.requires_grad]


@pytest.mark.slow
def test_compiled_generator_matches_eager_forward_and_gradients():
    eager, compiled = generator(None), generator("aot_eager")
    assert [n for n, _ in eager.named_parameters()] == [n for n, _ in compiled.named_parameters()]  # state dicts unchanged
    traced = []
    compiled.unet.conv_in.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    emb = torch.randn(2, 77, eager.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    out_e, grads_e = step(eager, x, emb)
    out_c, grads_c = step(compiled, x, emb)
    assert traced and traced[0]  # the UNet ran through torch.compile's capture, not eagerly
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
    assert len(grads_c) == len(grads_e) > 0
    for ge, gc in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(gc, ge, atol=1e-6, rtol=1e-3)
