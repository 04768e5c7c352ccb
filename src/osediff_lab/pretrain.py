"""`python -m osediff_lab.pretrain stage=vae|unet|samples|ship`: pretrain a small Stable-Diffusion-style base model.

Stage ``vae`` trains an AutoencoderKL (L1 + L2 + image-gradient reconstruction, a small KL term) and sets
its ``scaling_factor`` to 1 / std of its latents, as SD's 0.18215 was chosen. Stage ``unet`` trains an
epsilon-prediction UNet2DConditionModel on that VAE's scaled latents with the DDPM scaled-linear
schedule, conditioned through the CLIP text encoder on the prompts of ``unet.prompts`` (the nano base is
unconditional: the empty prompt and the negative prompt both mean "an image", so the real score's
classifier-free guidance stays in distribution). Stage ``samples`` writes a DDIM grid from the prior.

Everything lands in ``out_dir``: ``model/`` is a diffusers-format folder (tokenizer, text_encoder, vae,
unet, scheduler) that ``model=sd21_base model.pretrained_path=<out_dir>/model`` loads unchanged;
``checkpoints/<stage>/last.pt`` resumes a killed stage (re-run the same command); ``report.json``
holds each stage's steps, wall time, losses and held-out reconstruction PSNR. Stage ``ship`` copies the
folder and report into ``ship_dir`` (the package's nano asset) with SHA256SUMS.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Sampler
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from osediff_lab import resolvers  # noqa: F401  (registers the resolvers the configs use)
from osediff_lab.backbones.schedules import schedule_from_scheduler
from osediff_lab.data.datamodule import source_files
from osediff_lab.data.datasets import HQCropDataset
from osediff_lab.data.heldout import heldout_dataset
from osediff_lab.data.loader import WatchedDataLoader
from osediff_lab.ema import EMA
from osediff_lab.errors import ConfigError
from osediff_lab.io import atomic_write, atomic_write_text
from osediff_lab.lit.resume import Preemption
from osediff_lab.metrics.suite import MetricSuite, metric_defs
from osediff_lab.models.components import Components, build_random, load_pretrained
from osediff_lab.models.text import encode_prompts
from osediff_lab.paths import CONF_DIR

STAGES = ("vae", "unet", "samples", "ship")
log = logging.getLogger(__name__)


class StepSampler(Sampler[int]):
    """Endless global sample ids from position ``start``: per-epoch seeded permutations of ``n`` files, id =
    epoch * n + index (HQCropDataset seeds each crop from the id), so a resumed stage sees the same crops."""

    def __init__(self, n: int, seed: int, start: int = 0) -> None:
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self) -> Iterator[int]:
        pos = self.start
        while True:
            epoch, i = divmod(pos, self.n)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)
            for j in range(i, self.n):
                yield epoch * self.n + int(perm[j])
            pos = (epoch + 1) * self.n


def batches(cfg: DictConfig, batch_size: int, crop: int, seed: int, start_step: int) -> Iterator[torch.Tensor]:
    """HQ crops (B, 3, crop, crop) in [-1, 1] from ``cfg.data`` (any image source), from step ``start_step``."""
    d = cfg.data
    ds = HQCropDataset(source_files(d), crop, d.flip, d.small_image_policy, 1, seed=seed)
    sampler = StepSampler(len(ds), seed, start_step * batch_size)
    # its own generator: the loader must not draw from the global RNG, or a resumed stage would diverge
    loader = WatchedDataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=int(d.num_workers),
                        generator=torch.Generator().manual_seed(seed))
    for batch in loader:
        yield batch["hq"]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save: a kill mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup, then constant or cosine decay to 10% (multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    raise ConfigError(f"pretrain: schedule '{schedule}' must be constant or cosine")


def image_gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences of two image batches (any range): edges stay sharp."""
    dx = (x[..., :, 1:] - x[..., :, :-1]) - (y[..., :, 1:] - y[..., :, :-1])
    dy = (x[..., 1:, :] - x[..., :-1, :]) - (y[..., 1:, :] - y[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def vae_losses(vae: AutoencoderKL, x: torch.Tensor, w: DictConfig) -> dict[str, torch.Tensor]:
    """Weighted reconstruction and KL terms for a batch ``x`` in [-1, 1]; ``total`` is their sum."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    terms = {
        "l1": (rec - x).abs().mean(),
        "l2": F.mse_loss(rec, x),
        "grad": image_gradient_l1(rec, x),
        "kl": post.kl().mean() / x[0].numel(),  # per pixel, so the weight does not depend on the crop size
    }
    terms["total"] = sum(float(w[k]) * v for k, v in terms.items())
    return terms


@torch.no_grad()
def heldout_reconstruction(vae: AutoencoderKL, cfg: DictConfig) -> dict[str, float]:
    """Mean Y-PSNR (the evaluation's ``psnr``, pyiqa) of VAE reconstructions (posterior mode, 8-bit) and of
    bicubic x scale on the held-out crops."""
    from osediff_lab.data.resize import upsample_to

    ds = heldout_dataset(cfg.val, int(cfg.scale))
    hq = torch.stack([ds[i]["hq"] for i in range(len(ds))])
    lq = torch.stack([ds[i]["lq"] for i in range(len(ds))])
    rec = vae.decode(vae.encode(hq).latent_dist.mode()).sample.clamp(-1, 1)
    bic = upsample_to(lq, hq.shape[-2:])
    suite = MetricSuite(metric_defs(cfg.metric_defs, ["psnr"]), cfg.paths.weights_dir)

    def psnr(sr: torch.Tensor) -> float:
        """Mean PSNR of ``sr`` against the crops, both in [-1, 1] and rounded to 8 bits first."""
        q = lambda x: (((x + 1) / 2).clamp(0, 1) * 255).round() / 255  # noqa: E731  [-1, 1] -> 8-bit [0, 1]
        return sum(suite.score(q(sr), q(hq))["psnr"]) / len(ds)

    return {"heldout_recon_psnr_y": psnr(rec), "heldout_bicubic_psnr_y": psnr(bic), "heldout_crops": len(ds)}


def fit(
    cfg: DictConfig,
    stage: str,
    model: torch.nn.Module,
    loss_fn,
    sc: DictConfig,
) -> dict[str, Any]:
    """The shared loop: AdamW, warmup + schedule, grad clip, EMA, progress bar, atomic checkpoints every
    ``sc.ckpt_every`` steps and on SIGTERM / SIGUSR1 / SIGUSR2 (as training), automatic resume from ``checkpoints/<stage>/last.pt``.
    Returns the stage's stats; the trained (EMA when enabled) weights are left in ``model``."""
    out = Path(cfg.out_dir)
    ckpt = out / "checkpoints" / stage / "last.pt"
    opt = torch.optim.AdamW(model.parameters(), lr=float(sc.lr), betas=tuple(sc.betas), weight_decay=float(sc.weight_decay))
    ema = EMA(model.state_dict(), float(sc.ema_decay), warmup=int(sc.ema_warmup)) if sc.ema_decay else None
    step, wall, history = 0, 0.0, []
    if cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        step, wall, history = state["step"], state["wall_s"], state["history"]
        torch.set_rng_state(state["rng"])
        log.warning("%s: resuming from %s at step %d (resume=false starts over)", stage, ckpt, step)
    else:
        torch.manual_seed(int(cfg.seed))
    total = int(sc.max_steps)
    data = batches(cfg, int(sc.batch_size), int(sc.crop_size), int(cfg.seed), step)
    stopper = Preemption(ckpt)  # the training loop's signal handling (SIGTERM, SIGUSR1/2), without Lightning
    stopper.install()
    running: dict[str, float] = {}
    start = time.time() - wall
    deadline = start + 60 * float(sc.max_minutes) if sc.get("max_minutes") else math.inf
    stop_at = int(sc.stop_after) if sc.get("stop_after") else total  # stop early, keeping max_steps' schedule

    def checkpoint() -> None:
        save_checkpoint(ckpt, {
            "stage": stage, "step": step, "wall_s": time.time() - start, "history": history,
            "model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict() if ema else None,
            "rng": torch.get_rng_state(), "config": OmegaConf.to_container(cfg, resolve=True),
        })

    model.train()
    try:
        with tqdm(total=total, initial=step, desc=f"pretrain {stage}", dynamic_ncols=True, disable=not cfg.progress_bar) as bar:
            while step < min(total, stop_at) and stopper.received is None and time.time() < deadline:
                for g in opt.param_groups:
                    g["lr"] = float(sc.lr) * lr_factor(step, int(sc.warmup_steps), total, sc.schedule)
                terms = loss_fn(model, next(data))
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(sc.grad_clip))
                opt.step()
                if ema is not None:
                    ema.update(model.state_dict())
                step += 1
                for k, v in terms.items():
                    running[k] = running.get(k, float(v.detach())) * 0.95 + float(v.detach()) * 0.05
                if step % int(sc.log_every) == 0 or step == total:
                    history.append({"step": step, **{k: round(v, 6) for k, v in running.items()}})
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.items() if k in ("total", "l1", "eps")})
                bar.update(1)
                if step % int(sc.ckpt_every) == 0:
                    checkpoint()
    finally:
        stopper.release()
    checkpoint()
    if ema is not None:
        model.load_state_dict(ema.shadow)
    model.eval()
    return {"steps": step, "finished": step >= total, "wall_s": round(time.time() - start, 1), "history": history}


def base_components(cfg: DictConfig) -> Components:
    """Randomly initialised components at ``cfg.arch`` sizes (seeded: the text encoder stays random and frozen)."""
    torch.manual_seed(int(cfg.seed))
    arch = OmegaConf.create({"arch": cfg.arch})
    return build_random(arch)


def write_folder(folder: Path, parts: dict[str, Any]) -> None:
    """Save parts into the subfolders of a diffusers-format folder they are named by."""
    for name, part in parts.items():
        part.save_pretrained(folder / name)


def _command() -> str | None:
    """The CLI command of this Hydra job (None when called from Python)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return " ".join(["python -m osediff_lab.pretrain", *HydraConfig.get().overrides.task])


def update_report(out: Path, stage: str, stats: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """Merge one stage's stats (and the command and config that produced them) into report.json."""
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report[stage] = stats | {"command": _command(), "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write_text(path, json.dumps(report, indent=2))
    return report


def stage_vae(cfg: DictConfig) -> dict[str, Any]:
    """Train the AutoencoderKL; write vae/, tokenizer/, text_encoder/, scheduler/ into ``out_dir/model``."""
    comps = base_components(cfg)
    vae = comps.vae
    sc = cfg.vae
    stats = fit(cfg, "vae", vae, lambda m, x: vae_losses(m, x, sc.loss), sc)
    with torch.no_grad():  # SD's rule: scale latents to unit variance (0.18215 for SD's VAE)
        x = torch.cat([next(batches(cfg, 16, int(sc.crop_size), int(cfg.seed) + 1, i)) for i in range(int(sc.scale_batches))])
        std = float(vae.encode(x).latent_dist.sample().std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    stats |= {"scaling_factor": vae.config.scaling_factor, "params": sum(p.numel() for p in vae.parameters())}
    stats |= heldout_reconstruction(vae, cfg)
    write_folder(Path(cfg.out_dir) / "model", {"tokenizer": comps.tokenizer, "text_encoder": comps.text_encoder,
                                               "vae": comps.vae, "scheduler": comps.scheduler})
    return stats


def null_embeddings(comps: Components, prompts: list[str]) -> torch.Tensor:
    """Text embeddings of the conditioning prompts, (len(prompts), tokens, width)."""
    return encode_prompts(comps.tokenizer, comps.text_encoder, list(prompts))


def stage_unet(cfg: DictConfig) -> dict[str, Any]:
    """Train the epsilon-prediction UNet on the VAE's scaled latents; completes ``out_dir/model``."""
    folder = Path(cfg.out_dir) / "model"
    if not (folder / "vae").is_dir():
        raise ConfigError(f"stage=unet needs the VAE of stage=vae in {folder / 'vae'}: run `python -m osediff_lab.pretrain stage=vae` first")
    comps = base_components(cfg)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True).eval().requires_grad_(False)
    te = comps.text_encoder.eval().requires_grad_(False)
    comps.text_encoder = te
    sched = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
    schedule = schedule_from_scheduler(sched)
    sc = cfg.unet
    embeds = null_embeddings(comps, list(sc.prompts))
    probs = torch.tensor([float(p) for p in sc.prompt_probs])
    if len(probs) != len(embeds) or abs(float(probs.sum()) - 1) > 1e-6:
        raise ConfigError("unet.prompt_probs must give one probability per unet.prompts entry, summing to 1")
    sf = float(vae.config.scaling_factor)

    def loss_fn(unet: UNet2DConditionModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample() * sf
        b = z0.shape[0]
        t = torch.randint(0, sched.config.num_train_timesteps, (b,))
        noise = torch.randn_like(z0)
        z_t = schedule.add_noise(z0, noise, t)
        cond = embeds[torch.multinomial(probs, b, replacement=True)]
        eps = unet(z_t, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(eps, noise)
        return {"eps": loss, "total": loss}

    stats = fit(cfg, "unet", comps.denoiser, loss_fn, sc)
    stats["params"] = sum(p.numel() for p in comps.denoiser.parameters())
    write_folder(folder, {"unet": comps.denoiser})
    load_pretrained(folder)  # the finished folder loads exactly as model=sd21_base would load it
    return stats


@torch.no_grad()
def stage_samples(cfg: DictConfig) -> dict[str, Any]:
    """A grid of ``samples.num`` images from the finished model's UNet prior (DDIM, ``samples.steps`` steps)."""
    sc = cfg.samples
    folder = Path(cfg.out_dir) / "model"
    comps = load_pretrained(folder)
    ddim = DDIMScheduler.from_config(comps.scheduler.config)
    ddim.set_timesteps(int(sc.steps))
    g = torch.Generator().manual_seed(int(cfg.seed))
    side = int(sc.size) // (2 ** (len(comps.vae.config.block_out_channels) - 1))
    z = torch.randn(int(sc.num), comps.denoiser.config.in_channels, side, side, generator=g)
    cond = null_embeddings(comps, [sc.prompt]).expand(int(sc.num), -1, -1)
    for t in tqdm(ddim.timesteps, desc="DDIM", disable=not cfg.progress_bar):
        eps = comps.denoiser(z, t, encoder_hidden_states=cond).sample
        z = ddim.step(eps, t, z, eta=float(sc.eta), generator=g).prev_sample
    img = comps.vae.decode(z / comps.scaling_factor).sample.clamp(-1, 1)
    grid = make_grid(((img + 1) / 2).cpu(), nrow=int(sc.nrow), padding=2)
    path = Path(cfg.out_dir) / "prior_samples.png"
    atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    return {"path": str(path), "steps": int(sc.steps), "num": int(sc.num), "sampler": "DDIM", "eta": float(sc.eta)}


def stage_ship(cfg: DictConfig) -> dict[str, Any]:
    """Copy the finished model folder and its report to ``ship_dir`` and write SHA256SUMS over every file."""
    import hashlib
    import shutil

    src, dest = Path(cfg.out_dir) / "model", Path(cfg.ship_dir)
    load_pretrained(src)  # only a complete, loadable folder is shipped
    for sub in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        shutil.rmtree(dest / sub, ignore_errors=True)
        shutil.copytree(src / sub, dest / sub)
    report = json.loads((Path(cfg.out_dir) / "report.json").read_text())
    atomic_write_text(dest / "pretrain_report.json", json.dumps(report, indent=2))
    files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS", "README.md"))
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(dest).as_posix()}" for p in files]
    atomic_write_text(dest / "SHA256SUMS", "\n".join(lines) + "\n")
    return {"ship_dir": str(dest), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stage``; returns the updated report (also written to ``out_dir/report.json``)."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage='{cfg.stage}' must be one of {STAGES}")
    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = {"vae": stage_vae, "unet": stage_unet, "samples": stage_samples, "ship": stage_ship}[cfg.stage](cfg)
    if cfg.stage == "ship":
        print(f"\nosediff-lab pretrain: shipped {stats['files']} files ({stats['bytes'] / 2**20:.1f} MB) to {stats['ship_dir']}")
        return stats
    report = update_report(out, cfg.stage, stats, cfg)
    shown = {k: v for k, v in stats.items() if k not in ("history",)}
    print(f"\nosediff-lab pretrain: stage {cfg.stage} done -> {out}\n" + json.dumps(shown, indent=2))
    return report


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain")
def main(cfg: DictConfig) -> None:
    pretrain(cfg)


if __name__ == "__main__":
    main()
