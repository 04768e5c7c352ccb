"""osediff-lab: train, evaluate and run OSEDiff (one-step diffusion super-resolution)."""

import logging

__version__ = "0.1.0"


class _OptionalKernelNotice(logging.Filter):
    """Drops bitsandbytes' notice that the optional `kernels` package (a faster 4-bit CPU matmul) is missing:
    peft imports bitsandbytes at every start, and no code path here uses 4-bit layers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())
