"""python -m osediff_lab.export format=lora|diffusers|kohya|comfyui, the model card and push_to_hub.

- diffusers: the card's script, run in a subprocess that never imports osediff_lab, reproduces the project's
  pipeline within 1e-3 on the tiny twins (SD, SDXL, SD3, FLUX with its size-dependent shift and with a fixed one)
  and for every method (PiSA-SR at both one-call lambdas); FLUX's step in the script follows the latent's size as
  the schedule does, and its folder loads with diffusers' own classes;
- kohya: the denoiser file loaded by diffusers' own kohya conversion (``load_lora_weights`` + ``fuse_lora`` on a
  pipeline of the tiny components) gives the merged weights of the diffusers export;
- the card validates offline and a real run's card shows its numbers and sample grids; push_to_hub offline says
  the command and exits non-zero; a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from helpers import TINY, compose_config
from osediff_lab.backbones.sd import SDBackbone
from osediff_lab.export import main as export_main
from osediff_lab.exports import hub
from osediff_lab.exports.card import card_problems
from osediff_lab.exports.kohya import kohya_tensors, lora_factors, merge_kohya
from osediff_lab.models.lora_files import export_lora
from osediff_lab.pipeline import SRPipeline
from osediff_lab.pipeline.checkpoints import load_base, read_checkpoint
from osediff_lab.train import build_module, run
from test_pipeline import lq_batch

pytestmark = pytest.mark.usefixtures("single_thread")

OPTS = {"process_size": 32, "color_fix": "adain"}
LQ = lq_batch(8, 12)
HYPIR = ["method=hypir", "discriminator=convnext_tiny"]
PISA = ["method=pisasr_pixel"]
FLUX = ["model=tiny_flux", "generator.timestep=499"]  # mid-way: at 999 sigma is 1 whatever the shift
# (name, overrides) of the exports checked through the diffusers script
CASES = {
    "sd_osediff": ["model=tiny"],
    "sdxl_osediff": ["model=tiny_sdxl"],
    "sd3_osediff": ["model=tiny_sd3"],
    "sd_pisasr": ["model=tiny", *PISA],
    "sd_hypir": ["model=tiny", *HYPIR],
    "sd_osediff_gan": ["model=tiny", "method=osediff_gan"],
    "flux_osediff": FLUX,
    "flux_fixed_shift": [*FLUX, "model.shift_image_seq_len=1024"],
}


def make_export(overrides: list[str], path: Path) -> Path:
    """Our LoRA export of a tiny method built as train.py builds it, every LoRA tensor (both PiSA-SR sets too) and
    every trained tensor given a random offset, as training would."""
    cfg = compose_config([*TINY, *overrides], path.parent)
    torch.manual_seed(cfg.seed)
    module = build_module(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(module.method.generator.named_parameters()):
            if p.requires_grad or ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    state = {k: v.detach() for k, v in module.method.export_state_dict().items()}
    return export_lora(state, cfg, module.lora_targets, path)[0]


def card_script(folder: Path) -> str:
    """The python block of the card's usage section (the script the card tells users to run)."""
    text = (folder / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


class Exports:
    """Exports of the cases, each made once when first asked for: our LoRA file, its diffusers folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.weights, self.folders = root, {}, {}

    def __getitem__(self, case: str) -> Path:
        if case not in self.weights:
            self.weights[case] = make_export(CASES[case], self.root / case / "lora.safetensors")
        return self.weights[case]

    def diffusers(self, case: str) -> Path:
        """The case's format=diffusers folder (``<case>_pixel_only``: PiSA-SR at lambda_sem = 0)."""
        if case not in self.folders:
            source, lambdas = case.removesuffix("_pixel_only"), LAMBDAS.get(case, {})
            self.folders[case] = export(self[source], "diffusers", self.root / "diffusers" / case,
                                        *[f"pipeline.{k}={v}" for k, v in lambdas.items()])
        return self.folders[case]

    def denoiser(self, case: str, folder: str = "unet") -> dict[str, torch.Tensor]:
        """The merged denoiser weights of the case's diffusers folder."""
        return load_file(str(self.diffusers(case) / folder / "diffusion_pytorch_model.safetensors"))


LAMBDAS = {"sd_pisasr_pixel_only": {"lambda_sem": 0.0}}
FAST = ["sd_osediff"]  # also run in-process by the fast test
SLOW = ["sdxl_osediff", "sd3_osediff", "sd_pisasr", "sd_pisasr_pixel_only", "sd_hypir", "sd_osediff_gan", "flux_osediff",
        "flux_fixed_shift"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


def export(weights: Path, fmt: str, out: Path, *extra: str) -> Path:
    export_main([f"ckpt={weights}", f"out={out}", f"format={fmt}", "pipeline.process_size=32", *extra])
    return out


def script_runs(exports: Exports, cases: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{case: (the card script's SR, the project's SR)}, every case's script run in one subprocess."""
    folders = {case: exports.diffusers(case) for case in cases}
    lq = exports.root / "lq.pt"
    torch.save(LQ, lq)
    driver = textwrap.dedent(f"""
        import sys, torch
        lq = torch.load({str(lq)!r})
        for folder in {json.dumps([str(f) for f in folders.values()])}:
            scope = {{}}
            exec(open(folder + "/script.py").read(), scope)  # the card's code, as a user pastes it
            torch.save(scope["super_resolve"](folder, lq, scope["encode_prompt"], scope["call_denoiser"]), folder + "/sr.pt")
        assert "osediff_lab" not in sys.modules, "the script imported osediff_lab"
        print("no osediff_lab")
    """)
    for folder in folders.values():
        (folder / "script.py").write_text(card_script(folder))
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=exports.root, timeout=600)
    assert done.returncode == 0 and "no osediff_lab" in done.stdout, done.stderr[-3000:]
    outputs = {}
    for case, folder in folders.items():
        source = exports[case.removesuffix("_pixel_only")]
        project = SRPipeline.from_checkpoint(source, options={**OPTS, **LAMBDAS.get(case, {})})(LQ)
        outputs[case] = (torch.load(folder / "sr.pt"), project)
    return outputs


@pytest.fixture(scope="module")
def slow_runs(exports):
    return script_runs(exports, SLOW + FAST)


def check_script_output(script: torch.Tensor, project: torch.Tensor) -> None:
    assert script.shape == project.shape == (1, 3, 32, 48)
    assert (script - project).abs().max() < 1e-3
    assert project.std() > 0.01  # an image, not a constant


def test_the_cards_script_reproduces_the_pipeline(exports):
    """The card's code run here (the subprocess without osediff_lab is the slow test's)."""
    folder = exports.diffusers("sd_osediff")
    scope: dict = {}
    exec(card_script(folder), scope)
    script = scope["super_resolve"](folder, LQ, scope["encode_prompt"], scope["call_denoiser"])
    check_script_output(script, SRPipeline.from_checkpoint(exports["sd_osediff"], options=OPTS)(LQ))
    assert (folder / "infer.py").read_text().strip() == card_script(folder).strip()


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW + FAST)
def test_the_cards_script_reproduces_every_family_and_method_without_osediff_lab(slow_runs, case):
    check_script_output(*slow_runs[case])


@pytest.mark.slow
def test_pisasr_lambdas_needing_two_denoiser_calls_are_refused_and_leave_nothing(exports, tmp_path):
    with pytest.raises(SystemExit, match="two denoiser calls"):
        export(exports["sd_pisasr"], "diffusers", tmp_path / "out", "pipeline.lambda_sem=0.5")
    assert list(tmp_path.iterdir()) == []  # no folder, no partial one


def fused_unet(weights: Path, kohya: Path, pipeline_class: type, lora_files: list[str]) -> dict[str, torch.Tensor]:
    """The base's UNet with the kohya files loaded and fused by diffusers, and the fully trained tensors replaced."""
    c = load_base(read_checkpoint(weights))
    parts = {"vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer, "unet": c.denoiser, "scheduler": c.scheduler}
    if pipeline_class is StableDiffusionXLPipeline:
        parts |= {"text_encoder_2": c.text_encoder_2, "tokenizer_2": c.tokenizer_2}
    else:
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = pipeline_class(**parts)
    names = [Path(f).stem for f in lora_files]
    for file, name in zip(lora_files, names, strict=True):
        pipe.load_lora_weights(str(kohya / file), adapter_name=name)
    pipe.set_adapters(names, [1.0] * len(names))
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    if (kohya / "unet_trained_layers.safetensors").is_file():  # OSEDiff's conv_in (PiSA-SR trains none in full)
        pipe.unet.load_state_dict(load_file(str(kohya / "unet_trained_layers.safetensors")), strict=False)
    return pipe.unet.state_dict()


@pytest.mark.parametrize("case, pipeline_class, files", [
    ("sd_osediff", StableDiffusionPipeline, ["unet_lora.safetensors"]),
    pytest.param("sdxl_osediff", StableDiffusionXLPipeline, ["unet_lora.safetensors"], marks=pytest.mark.slow),
    pytest.param("sd_pisasr", StableDiffusionPipeline, ["unet_lora_pixel.safetensors", "unet_lora_semantic.safetensors"],
                 marks=pytest.mark.slow),
])
def test_kohya_files_merge_through_diffusers_to_the_merged_export(exports, tmp_path, case, pipeline_class, files):
    kohya = export(exports[case], "kohya", tmp_path / "kohya")
    assert sorted(p.name for p in kohya.glob("unet_lora*.safetensors")) == sorted(files)
    lora = load_file(str(kohya / files[0]))
    assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in lora)
    theirs = fused_unet(exports[case], kohya, pipeline_class, files)
    merged = exports.denoiser(case)
    assert set(theirs) == set(merged)
    worst = max((theirs[k] - merged[k]).abs().max().item() for k in merged)
    assert worst < 1e-5, worst


@pytest.mark.slow
@pytest.mark.parametrize(("case", "fmt"), [("sd3_osediff", "comfyui"), ("flux_osediff", "kohya")])
def test_a_transformer_familys_kohya_file_uses_the_transformer_prefix_and_merges_to_the_export(case, fmt, exports, tmp_path):
    kohya = export(exports[case], fmt, tmp_path / "kohya")
    lora = load_file(str(kohya / "transformer_lora.safetensors"))
    assert lora and all(k.startswith("lora_transformer_") for k in lora)
    base = load_base(read_checkpoint(exports[case])).denoiser.state_dict()
    ours = merge_kohya(base, lora, "lora_transformer_") | load_file(str(kohya / "transformer_trained_layers.safetensors"))
    merged = exports.denoiser(case, "transformer")
    assert max((ours[k] - merged[k]).abs().max().item() for k in merged) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("case", ["flux_osediff", "flux_fixed_shift"])
def test_the_flux_scripts_step_follows_the_latent_size_as_the_schedule_does(exports, case):
    """The script's (a, b, t) on latents of 6 to 1536 tokens equal the project's step and timestep there (the shift
    moves them with the size, or, with model.shift_image_seq_len, not); the folder loads with diffusers' classes."""
    folder = exports.diffusers(case)
    meta = json.loads((folder / "osediff_export.json").read_text())
    scope: dict = {}
    exec(card_script(folder), scope)
    gen = SRPipeline.from_checkpoint(exports[case], options=OPTS).generator
    t = torch.tensor([gen.timestep])
    timesteps = set()
    for h, w in [(4, 6), (32, 32), (64, 96)]:
        z, out = torch.randn(1, 16, h, w), torch.randn(1, 16, h, w)
        a, b, timestep = scope["one_step"](meta, z)
        assert timestep == pytest.approx(gen.schedule.model_timestep(t, z).item(), rel=1e-5)
        torch.testing.assert_close(a * z + b * out, gen.schedule.x0_from_output(z, out, t), atol=1e-5, rtol=1e-5)
        timesteps.add(round(timestep, 3))
    assert len(timesteps) == (1 if case == "flux_fixed_shift" else 3)
    net = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    assert net.config.guidance_embeds and vae.config.latent_channels == 16 and meta["denoiser_class"] == type(net).__name__
    base = load_base(read_checkpoint(exports[case])).denoiser.state_dict()
    assert max((base[k] - v).abs().max().item() for k, v in net.state_dict().items()) > 1e-3  # the LoRA is merged in


def test_a_backbone_without_a_standalone_pair_is_refused_by_name(exports, tmp_path, monkeypatch):
    monkeypatch.setattr(SDBackbone, "standalone", None)
    with pytest.raises(SystemExit, match="standalone = \\(encode_prompt, call_denoiser\\)"):
        export(exports["sd_osediff"], "diffusers", tmp_path / "diffusers")
    assert not (tmp_path / "diffusers").exists()


def test_kohya_layout_by_hand():
    linear, conv = torch.nn.Linear(3, 2), torch.nn.Conv2d(2, 4, 3)
    model = torch.nn.Sequential(linear, conv)
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"]), model)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    (lin, cv) = lora_factors(model)
    tensors = kohya_tensors([lin, cv], "lora_unet_")
    assert tensors["lora_unet_0.lora_down.weight"].shape == (2, 3) and tensors["lora_unet_0.lora_up.weight"].shape == (2, 2)
    assert tensors["lora_unet_1.lora_down.weight"].shape == (2, 2, 3, 3) and float(tensors["lora_unet_0.alpha"]) == 4.0
    base = {"0.weight": model[0].base_layer.weight.detach(), "1.weight": model[1].base_layer.weight.detach()}
    merged = merge_kohya(base, tensors, "lora_unet_")
    delta = model[0].lora_B["default"].weight @ model[0].lora_A["default"].weight * 2.0
    torch.testing.assert_close(merged["0.weight"], base["0.weight"] + delta)
    x = torch.randn(1, 2, 5, 5)
    expected = model[1](x)  # PEFT's conv LoRA, unmerged
    got = torch.nn.functional.conv2d(x, merged["1.weight"], model[1].base_layer.bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_card_validates_offline_and_names_what_breaks_it(exports, tmp_path):
    folder = export(exports["sd_osediff"], "lora", tmp_path / "lora")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "osediff_lora.json", "osediff_lora.safetensors"]
    assert card_problems(folder / "README.md") == []
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "other" and card.data.pipeline_tag == "image-to-image" and "osediff" in card.data.tags
    assert torch.equal(SRPipeline.from_checkpoint(folder / "osediff_lora.safetensors", options=OPTS)(LQ),
                       SRPipeline.from_checkpoint(exports["sd_osediff"], options=OPTS)(LQ))
    (folder / "README.md").write_text(card.content.replace("license: other\n", "") + "\n![grid](images/nowhere.png)\n")
    problems = " ".join(card_problems(folder / "README.md"))
    assert "no licence" in problems and "images/nowhere.png is missing" in problems


def test_push_to_hub_offline_prints_the_command_and_exits_non_zero(exports, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        export(exports["sd_osediff"], "lora", tmp_path / "out", "push_to_hub=me/osediff-tiny")
    assert stop.value.code == 3
    err = capsys.readouterr().err
    assert f"hf upload me/osediff-tiny {tmp_path / 'out'} . --repo-type model" in err and "upload_folder(" in err
    assert (tmp_path / "out" / "README.md").is_file() and len(list(tmp_path.iterdir())) == 1  # complete, nothing partial


def test_push_to_hub_with_a_token_creates_the_repo_and_uploads_the_folder(exports, tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo, **kwargs):
            calls.append(("create", repo, kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload", kwargs["repo_id"], sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())))
            return type("Commit", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr(hub, "hub_blocker", lambda: None)
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    export(exports["sd_osediff"], "lora", tmp_path / "out", "push_to_hub=me/x", "private=true")
    assert calls[0] == ("create", "me/x", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1] == ("upload", "me/x", ["README.md", "osediff_lora.json", "osediff_lora.safetensors"])


@pytest.mark.slow
def test_a_short_runs_card_shows_its_numbers_and_sample_grids(tmp_path):
    cfg = compose_config([*TINY, "trainer.max_steps=2", "trainer.log_every_n_steps=1", "val=demo", "val.every_n_steps=2",
                          "val.metrics=[psnr,ssim]", "callbacks.samples.every_n_steps=1", "callbacks.samples.num_images=1"],
                         tmp_path)
    summary = run(cfg)[2]
    card_path = Path(summary["lora"]).parent / "README.md"
    assert card_problems(card_path) == []
    text = card_path.read_text()
    psnr, bicubic = summary["last_metrics"]["val/psnr"], summary["last_metrics"]["val/bicubic_psnr"]
    assert f"| psnr | {psnr:.4g} |" in text and f"| {bicubic:.4g} |" in text and "At step 2" in text
    assert "`demo`" in text and f"degradation `{cfg.degradation.name}`" in text
    grids = sorted(Path(summary["samples_dir"]).glob("*.png"))[-2:]
    for grid in grids:
        assert f"(images/{grid.name})" in text and (card_path.parent / "images" / grid.name).read_bytes() == grid.read_bytes()
    meta = ModelCard.load(card_path).data.to_dict()
    assert {r["metrics"][0]["type"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}["psnr"] == psnr
