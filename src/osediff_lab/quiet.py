"""Library messages a user cannot act on, silenced once (at package import), each with the reason.

Only these exact messages are dropped; every other warning and log line of those libraries still shows.
"""

from __future__ import annotations

import logging
import warnings

# (logger, message prefix, why it is not the user's business)
LOG_NOTICES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward",
     "peft imports bitsandbytes at every start; the optional `kernels` package only speeds up 4-bit CPU layers, "
     "which nothing here uses"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
     "the same import on CPUs with AVX512-BF16: bitsandbytes asks `kernels` for that optional kernel, and in Hub "
     "offline mode `kernels` says it skips a trust check before that lookup fails as in the entry above"),
    ("pytorch_lightning.utilities.rank_zero", "💡 Tip:", "Lightning advertising a logging service"),
)

# (warning message regex, why)
WARNINGS = (
    (r"Found \d+ module\(s\) in eval mode at the start of training",
     "the frozen VAE decoder, text encoder and regularizer base stay in eval mode by design"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning's own pytree helper (torch API change)"),
    (r"You have overridden `on_after_batch_transfer` in `LightningModule`",
     "the module degrades batches on the device after transfer, on purpose"),
    (r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state",
     "a checkpoint holds the state after its step on purpose (resume continues from it); Lightning's hint, a "
     "`saved_models` attribute, is its own test's"),
    (r"The `srun` command is available on your system but is not used",
     "plain runs on a Slurm login node are intended; Slurm jobs go through trainer=slurm / hydra/launcher=slurm"),
)


class _DropPrefix(logging.Filter):
    """Drops records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


class _WarningsAndUp(logging.Filter):
    """pyiqa announces every metric it builds at INFO ("Network [PSNR] is created."); its warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def install() -> None:
    """Add the filters (idempotent: filters and warning rules already present are not added twice)."""
    for name, prefix, _why in LOG_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropPrefix(prefix))
    pyiqa = logging.getLogger("pyiqa")
    if not any(isinstance(f, _WarningsAndUp) for f in pyiqa.filters):
        pyiqa.addFilter(_WarningsAndUp())
    for pattern, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
