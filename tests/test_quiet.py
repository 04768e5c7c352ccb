"""The warning policy (osediff_lab.quiet): the exact library notices it names are dropped at their loggers,
everything else those loggers say still shows."""

from __future__ import annotations

import logging

import pytest

from osediff_lab import quiet


def test_the_kernels_trust_notice_of_bitsandbytes_import_is_dropped_and_others_of_that_logger_show(caplog):
    """bitsandbytes asks `kernels` for its CPU 4-bit kernel at import; offline, kernels' own check logs the notice."""
    hf_hub = pytest.importorskip("kernels._internals.hf_hub")
    quiet.install()
    quiet.install()  # idempotent: one filter per notice
    assert sum(isinstance(f, quiet._DropPrefix) for f in logging.getLogger(hf_hub.__name__).filters) == 1
    with caplog.at_level(logging.WARNING):
        hf_hub._check_trust_remote_code("kernels-community/quantization-bitsandbytes", True, False)
        assert caplog.records == []
        hf_hub._check_trust_remote_code("someone/else", True, False)  # a kernel someone asked for: still said
    assert [r.name for r in caplog.records] == [hf_hub.__name__]
    assert "Skipping publisher trust check for 'someone/else'" in caplog.records[0].getMessage()


@pytest.mark.parametrize(("logger", "prefix", "why"), quiet.LOG_NOTICES)
def test_each_dropped_notice_is_only_its_own_message(logger, prefix, why):
    drop = next(f for f in logging.getLogger(logger).filters if isinstance(f, quiet._DropPrefix) and f.prefix == prefix)
    record = logging.LogRecord(logger, logging.WARNING, __file__, 1, prefix + " and the rest", None, None)
    other = logging.LogRecord(logger, logging.WARNING, __file__, 1, "something else: " + prefix, None, None)
    assert why and not drop.filter(record) and drop.filter(other)
