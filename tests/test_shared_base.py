"""One frozen base in memory (generator.share_base): OSEDiff's generator, fake score and real score on one set of
pretrained denoiser weights train bit for bit as with a separate copy for the generator, on the tiny twin of every
family; and gradient checkpointing recomputes with the adapters that were active at forward time."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, compose_config
from osediff_lab.errors import ConfigError
from osediff_lab.memory import training_step
from osediff_lab.models import osediff as osediff_build
from osediff_lab.models.lora import adapters_disabled, enable_checkpointing
from osediff_lab.paths import CONF_DIR
from osediff_lab.train import build_module

pytestmark = pytest.mark.usefixtures("single_thread")
TINY_MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("tiny*.yaml"))  # a family's tiny twin joins by its preset


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the module's parameters and buffers."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()]}
    return sum(seen.values())


def run_steps(model: str, share: bool, steps: int, *extra: str) -> dict:
    """``steps`` training steps of OSEDiff on ``model``'s tiny twin in fp32 from seed 0: the losses per step, every
    trained tensor after them, the generator's output on a fixed input, and the module's bytes."""
    cfg = compose_config([*TINY, f"model={model}", f"generator.share_base={str(share).lower()}", *extra])
    torch.manual_seed(0)
    module = build_module(cfg).train()
    hq = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    step = training_step(module, hq)
    logs = []
    original = module.optimize_batch
    module.optimize_batch = lambda *a, **k: logs.append(original(*a, **k)) or logs[-1]
    for _ in range(steps):
        step()
    losses = [{k: v.detach().clone() for k, v in log.items() if k.startswith("train/loss_")} for log in logs]
    embeds = module.encode_text([""] * 2)
    with torch.no_grad():
        x_h, z_h = module.generator(hq, embeds, generator=torch.Generator().manual_seed(2))
    trained = {n: p.detach().clone() for n, p in module.trained_state_dict().items()}
    return {"losses": losses, "trained": trained, "x_h": x_h, "z_h": z_h, "bytes": storage_bytes(module), "module": module}


@pytest.mark.slow
@pytest.mark.parametrize("model", TINY_MODELS)
def test_shared_base_trains_bit_for_bit_as_separate_copies(model):
    shared, separate = run_steps(model, True, 3), run_steps(model, False, 3)
    gen, reg = shared["module"].method.generator.unet, shared["module"].method.reg_unet
    base = {id(p) for p in reg.parameters()}
    frozen = [n for n, p in gen.named_parameters() if not p.requires_grad and ".lora_" not in n]
    assert frozen and all(id(dict(gen.named_parameters())[n]) in base for n in frozen)  # one set of base weights
    copy = separate["module"].method.generator.unet
    frozen_copy = storage_bytes(copy) - sum(p.untyped_storage().nbytes() for p in copy.parameters() if p.requires_grad)
    assert separate["bytes"] - shared["bytes"] == frozen_copy > 0  # the generator's copy of the frozen base, gone
    assert shared["trained"].keys() == separate["trained"].keys()
    for name, value in separate["trained"].items():
        assert torch.equal(shared["trained"][name], value), name
    for step_shared, step_separate in zip(shared["losses"], separate["losses"], strict=True):
        assert step_shared.keys() == step_separate.keys() and {"train/loss_vsd", "train/loss_regularizer"} <= step_shared.keys()
        for key, value in step_separate.items():
            assert torch.equal(step_shared[key], value), key
    assert torch.equal(shared["x_h"], separate["x_h"]) and torch.equal(shared["z_h"], separate["z_h"])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [("generator.gradient_checkpointing=true",), ("method=osediff_gan",)])
def test_shared_base_bit_for_bit_with_checkpointing_and_the_gan_method(extra):
    shared, separate = run_steps("tiny", True, 2, *extra), run_steps("tiny", False, 2, *extra)
    for name, value in separate["trained"].items():
        assert torch.equal(shared["trained"][name], value), name
    assert torch.equal(shared["x_h"], separate["x_h"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["osediff", "osediff_gan"])
def test_checkpointing_generator_and_regularizer_changes_no_bit(method):
    """generator.gradient_checkpointing recomputes the generator's and the fake score's blocks (the regularizer's
    step and the GAN's features of the regularizer UNet): the same numbers as keeping the activations."""
    kept = run_steps("tiny", True, 2, f"method={method}")
    recomputed = run_steps("tiny", True, 2, f"method={method}", "generator.gradient_checkpointing=true")
    assert recomputed["module"].method.reg_unet.mid_block.gradient_checkpointing
    for name, value in kept["trained"].items():
        assert torch.equal(recomputed["trained"][name], value), name
    for a, b in zip(kept["losses"], recomputed["losses"], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_share_base_refuses_a_trained_tensor_of_the_shared_base(monkeypatch):
    """A generator that trained a layer the pretrained denoiser holds would move the real and fake scores with it."""
    share_all = osediff_build.shared_base_copy
    monkeypatch.setattr(osediff_build, "shared_base_copy", lambda model, own=(): share_all(model))  # conv_in shared too
    with pytest.raises(ConfigError, match=r"share_base=true: the generator trains \d+ tensors .*conv_in"):
        build_module(compose_config([*TINY, "generator.share_base=true"]))


def lora_unet_grads(checkpointing: str) -> dict[str, torch.Tensor] | Exception:
    """Gradients of the generator's trained tensors from a forward with its adapters on and a backward run while
    they are switched off (a real-score call between them): ``checkpointing`` none | diffusers | adapters."""
    torch.manual_seed(0)
    module = build_module(compose_config(TINY))
    unet = module.method.generator.unet
    if checkpointing == "diffusers":
        unet.enable_gradient_checkpointing()
    elif checkpointing == "adapters":
        enable_checkpointing(unet)
    unet.train()
    z = torch.randn(1, 4, 8, 8)
    embeds = module.encode_text([""])
    out = module.method.generator.predict(z, torch.tensor([999]), embeds)
    trained = [p for p in unet.parameters() if p.requires_grad]
    with adapters_disabled(unet):
        for p in trained:  # PEFT's switch also clears requires_grad, which would drop the gradients altogether
            p.requires_grad_(True)
        try:
            out.square().mean().backward()
        except Exception as exc:  # torch's checkpoint may notice the recomputation differs
            return exc
    return {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_checkpointing_recomputes_with_the_adapters_active_at_forward():
    reference = lora_unet_grads("none")  # plain autograd keeps the forward's tensors: switching later changes nothing
    kept = lora_unet_grads("adapters")
    plain = lora_unet_grads("diffusers")
    assert isinstance(reference, dict) and isinstance(kept, dict)
    for name, grad in reference.items():
        torch.testing.assert_close(kept[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # diffusers' own checkpointing recomputes with the adapters off: wrong gradients, or torch refuses the mismatch
    assert isinstance(plain, Exception) or any(not torch.allclose(plain[n], g, rtol=1e-3, atol=1e-6) for n, g in reference.items())
