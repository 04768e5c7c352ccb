"""HQ training datasets: random crop + horizontal flip of images found on disk."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from osediff_lab.data.images import UnreadableImage, image_size, load_rgb, pil_to_tensor
from osediff_lab.data.sampling import sample_generator
from osediff_lab.errors import ConfigError

log = logging.getLogger(__name__)

SMALL_IMAGE_POLICIES = ("error", "skip", "upscale")


class HQCropDataset(Dataset):
    """Yields {"hq": (3, crop, crop) in [-1, 1], "path": str}; unreadable files are skipped, counted in
    ``skipped`` and explained in ``reasons`` (path -> why).

    Images smaller than the crop follow ``small_image_policy``: ``error`` (refuse before training),
    ``skip`` (drop them), or ``upscale`` (bicubic-enlarge the short side to the crop size).
    With ``seed`` set, indices may be global sample ids (``ResumableRandomSampler``): the file is
    ``id % len`` and the crop/flip come from a generator seeded by (seed, id), so a sample is the
    same whatever the worker count or a resume; without it crops use the global torch RNG.
    """

    def __init__(
        self,
        files: list[Path],
        crop_size: int,
        flip: bool = True,
        small_image_policy: str = "error",
        repeat: int = 1,
        seed: int | None = None,
    ) -> None:
        if small_image_policy not in SMALL_IMAGE_POLICIES:
            raise ConfigError(f"data.small_image_policy must be one of {SMALL_IMAGE_POLICIES}, got '{small_image_policy}'")
        self.crop_size = crop_size
        self.flip = flip
        self.seed = seed
        self.policy = small_image_policy
        self.reasons: dict[str, str] = {}  # unreadable file -> why; its keys are ``skipped``
        self.small: list[str] = []
        usable: dict[Path, bool] = {}  # each distinct file's header is read once, however often it is listed
        for f in dict.fromkeys(Path(f) for f in files):
            try:
                w, h = image_size(f)
            except UnreadableImage as exc:
                log.warning("skipping unreadable image %s", exc)
                self.reasons[str(f)] = exc.reason
                usable[f] = False
                continue
            if min(w, h) < crop_size:
                self.small.append(str(f))
            usable[f] = min(w, h) >= crop_size or small_image_policy != "skip"
        kept = [Path(f) for f in files if usable[Path(f)]]
        if self.small and small_image_policy == "error":
            raise ConfigError(
                f"{len(self.small)} image(s) are smaller than data.crop_size={crop_size} (e.g. {self.small[0]}); "
                "lower data.crop_size or set data.small_image_policy=skip|upscale"
            )
        if self.small:
            log.info("%d image(s) smaller than the crop: policy '%s'", len(self.small), small_image_policy)
        if self.skipped:
            log.warning("%d of %d file(s) unreadable and skipped (e.g. %s)", len(self.skipped), len(files), self.skipped[0])
        log.info(
            "dataset: %d of %d files used (%d unreadable, %d smaller than %d: %s)",
            len(kept), len(files), len(self.skipped), len(self.small), crop_size, small_image_policy,
        )
        if not kept:
            raise ConfigError(f"no usable images (of {len(files)} files; {len(self.skipped)} unreadable, {len(self.small)} too small)")
        self.files = kept * max(1, int(repeat))

    @property
    def skipped(self) -> list[str]:
        """The unreadable files, in the order they were found."""
        return list(self.reasons)

    def __len__(self) -> int:
        return len(self.files)

    def _crop(self, im: Image.Image, g: torch.Generator | None = None) -> torch.Tensor:
        w, h = im.size
        c = self.crop_size
        if min(w, h) < c:
            s = c / min(w, h)
            im = im.resize((max(c, round(w * s)), max(c, round(h * s))), Image.BICUBIC)
            w, h = im.size
        top = int(torch.randint(0, h - c + 1, (), generator=g).item())
        left = int(torch.randint(0, w - c + 1, (), generator=g).item())
        x = pil_to_tensor(im.crop((left, top, left + c, top + c)))
        if self.flip and torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        return x * 2 - 1

    def __getitem__(self, index: int) -> dict:
        """The crop of file ``index``; a file that fails to load (corrupt, or gone since the scan) is
        skipped for the next one, remembered, and counted in ``skipped`` (per worker process)."""
        g = sample_generator(self.seed, index) if self.seed is not None else None
        index %= len(self.files)
        found: list[str] = []  # "path<TAB>reason" of files found unreadable by this call
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            if str(path) in self.reasons:
                continue
            try:
                # ``unreadable`` carries what a worker process found back to the trainer (its summary)
                return {"hq": self._crop(load_rgb(path), g), "path": str(path), "unreadable": "\n".join(found)}
            except UnreadableImage as exc:
                self.reasons[str(path)] = exc.reason
                found.append(f"{path}\t{exc.reason}")
                log.warning("skipping unreadable image during training (%d skipped so far): %s", len(self.skipped), exc)
        raise RuntimeError(f"every image in the dataset became unreadable ({len(self.skipped)} skipped, e.g. {self.skipped[:3]})")
