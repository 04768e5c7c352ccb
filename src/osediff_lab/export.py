"""`python -m osediff_lab.export ckpt=<lightning .ckpt> out=<file.safetensors>`: the LoRA-only inference
weights (safetensors + JSON sidecar, ``osediff_lab.models.lora_files``) of a training checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.models.lora_files import export_from_checkpoint


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    """CLI: ``ckpt=<lightning .ckpt> out=<file.safetensors>``."""
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    missing = [k for k in ("ckpt", "out") if args.get(k) is None]
    if missing:
        raise SystemExit(f"usage: python -m osediff_lab.export ckpt=<lightning .ckpt> out=<file.safetensors> (missing {missing})")
    try:
        weights, sidecar = export_from_checkpoint(args.ckpt, args.out)
    except (ConfigError, MissingWeightsError) as exc:
        raise SystemExit(f"export failed: {exc}") from exc
    print(f"LoRA weights {weights}\nsidecar      {sidecar}")
    return weights, sidecar


if __name__ == "__main__":
    main()
