"""GAN losses as pure functions of discriminator logits.

A discriminator gives its logits as a list of levels, each (B, ...): a patch map per sample or one value per
sample. Every loss here sums its per-level values, so with one level it is the textbook formula.

- ``nonsaturating``: D minimises softplus(-D(real)) + softplus(D(fake)), G minimises softplus(-D(fake)), each the
  mean over a level (DMD2, github tianweiy/DMD2@8d8fa55 main/sd_guidance.py:323 and :391).
- ``hinge``: D minimises relu(1 - D(real)) + relu(1 + D(fake)), G minimises -D(fake) (vision-aided-gan,
  github nupurkmr9/vision-aided-gan@95fc55b vision_aided_loss/cv_losses.py:66-81).
- ``multilevel_sigmoid``: vision-aided's ``multilevel_loss`` (cv_losses.py:26-47), HYPIR's (model/D.py:62 with
  alpha 0.8): per level the binary cross-entropy of the logits against a target (``real_target`` for real images
  and for the generator's own loss, 0 for fakes), averaged over each sample's values, summed over levels, then
  averaged over the batch (HYPIR trainer/base.py:284, :302-304 take that mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("nonsaturating", "hinge", "multilevel_sigmoid")
Logits = list[torch.Tensor]


def nonsaturating_d(real: Logits, fake: Logits) -> torch.Tensor:
    """The discriminator's non-saturating loss: sum over levels of mean softplus(-real) + mean softplus(fake)."""
    return sum(F.softplus(-r.float()).mean() for r in real) + sum(F.softplus(f.float()).mean() for f in fake)


def nonsaturating_g(fake: Logits) -> torch.Tensor:
    """The generator's non-saturating loss: sum over levels of mean softplus(-fake)."""
    return sum(F.softplus(-f.float()).mean() for f in fake)


def hinge_d(real: Logits, fake: Logits) -> torch.Tensor:
    """The discriminator's hinge loss: sum over levels of mean relu(1 - real) + mean relu(1 + fake)."""
    return sum(F.relu(1 - r.float()).mean() for r in real) + sum(F.relu(1 + f.float()).mean() for f in fake)


def hinge_g(fake: Logits) -> torch.Tensor:
    """The generator's hinge loss: minus the sum over levels of the mean fake logit."""
    return -sum(f.float().mean() for f in fake)


def multilevel_sigmoid(levels: Logits, target: float) -> torch.Tensor:
    """Binary cross-entropy of every level's logits against ``target``, averaged over each sample's values, summed
    over levels, averaged over the batch."""
    per_sample = sum(
        F.binary_cross_entropy_with_logits(x.float(), torch.full_like(x.float(), target), reduction="none").flatten(1).mean(1)
        for x in levels
    )
    return per_sample.mean()


def discriminator_loss(kind: str, real: Logits, fake: Logits, real_target: float) -> torch.Tensor:
    """The discriminator's loss ``kind`` (one of ``LOSSES``) on real and fake logits."""
    if kind == "nonsaturating":
        return nonsaturating_d(real, fake)
    if kind == "hinge":
        return hinge_d(real, fake)
    return multilevel_sigmoid(real, real_target) + multilevel_sigmoid(fake, 0.0)


def generator_loss(kind: str, fake: Logits, real_target: float) -> torch.Tensor:
    """The generator's loss ``kind`` on the discriminator's logits of its outputs."""
    if kind == "nonsaturating":
        return nonsaturating_g(fake)
    if kind == "hinge":
        return hinge_g(fake)
    return multilevel_sigmoid(fake, real_target)


def r1_penalty(real: Logits, real_input: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018) without its gamma / 2: the batch mean of ||d s / d x||^2, where s(x) is the sum over
    levels of each sample's mean logit and x is ``real_input`` (which the logits were computed from with grad)."""
    score = sum(x.float().flatten(1).mean(1) for x in real).sum()
    (grad,) = torch.autograd.grad(score, real_input, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def mean_logit(levels: Logits) -> torch.Tensor:
    """The mean over levels of each level's mean logit (a diagnostic, detached)."""
    return torch.stack([x.detach().float().mean() for x in levels]).mean()


def accuracy(real: Logits, fake: Logits) -> torch.Tensor:
    """The share of samples the discriminator gets right (real logit > 0, fake logit < 0), averaged over levels and
    over real and fake (a diagnostic, detached): near 1 for long, the generator gets no signal."""
    right = [(r.detach() > 0).float().mean() for r in real] + [(f.detach() < 0).float().mean() for f in fake]
    return torch.stack(right).mean()


def loss_problems(loss: str, real_target: float, r1_gamma: float) -> list[str]:
    """Config problems of a discriminator's loss settings (``discriminator.*``)."""
    problems = []
    if loss not in LOSSES:
        problems.append(f"discriminator.loss='{loss}' must be one of {list(LOSSES)}")
    if not 0 < real_target <= 1:
        problems.append(f"discriminator.real_target={real_target} must be in (0, 1]")
    elif loss != "multilevel_sigmoid" and real_target != 1:
        problems.append(f"discriminator.real_target={real_target} smooths the labels of loss=multilevel_sigmoid; "
                        f"loss={loss} has no labels: leave it at 1")
    if r1_gamma < 0:
        problems.append(f"discriminator.r1_gamma={r1_gamma} must be >= 0 (0: no R1 penalty)")
    return problems
