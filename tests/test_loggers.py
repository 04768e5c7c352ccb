"""The loggers' own bookkeeping: the CSV journal (rows on disk once logged, earlier attempts' rows kept, the
header widened) and what the W&B logger knows W&B holds (finished attempts only; unfinished offline folders set
aside, their rows sent again from the journal), checked by reading W&B's offline files back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from osediff_lab.lit.loggers import (
    DELIVERED,
    UNFINISHED,
    AppendingCSVLogger,
    csv_logger,
    journal_rows,
    read_delivered,
    record_delivered,
    set_aside_unfinished,
)
from wandb_files import history_matches_journal, read_history


def test_csv_journal_continues_an_earlier_attempt_and_widens_its_header(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,train/a\n0,1.0\n1,2.0\n")  # an earlier attempt's rows
    logger = csv_logger(tmp_path)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"train/a": 3.0}, step=2)
    assert (tmp_path / "csv" / "metrics.csv").read_text() == "step,train/a\n0,1.0\n1,2.0\n2,3.0\n"  # on disk, no save()
    logger.log_metrics({"train/b": 4.0, "train/a": 5.0}, step=3)
    assert (tmp_path / "csv" / "metrics.csv").read_text().splitlines() == [
        "step,train/a,train/b", "0,1.0,", "1,2.0,", "2,3.0,", "3,5.0,4.0"]
    logger.log_metrics({"val/c": 6.0}, step=3)  # rows of one step are merged by the reader
    assert journal_rows(tmp_path / "csv")[-1] == (3, {"train/a": 5.0, "train/b": 4.0, "val/c": 6.0})
    assert (tmp_path / "csv" / "hparams.yaml").read_text().strip() == "lr: 0.1"
    logger.finalize("success")
    again = csv_logger(tmp_path)  # the next attempt continues the file
    again.log_metrics({"train/a": 7.0}, step=4)
    assert [s for s, _ in journal_rows(tmp_path / "csv")] == [0, 1, 2, 3, 4]


def test_csv_journal_on_a_non_zero_rank_does_not_crash(tmp_path, monkeypatch):
    """Non-zero DDP ranks get Lightning's placeholder experiment and write nothing."""
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,train/loss_total\n0,1.0\n")
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = AppendingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.experiment  # noqa: B018  (starting it is the test)
    logger.log_metrics({"train/loss_total": 2.0}, step=1)
    assert (tmp_path / "csv" / "metrics.csv").read_text() == "step,train/loss_total\n0,1.0\n"


def test_unfinished_offline_folders_are_set_aside_and_finished_ones_recorded(tmp_path):
    wandb_dir = tmp_path / "wandb"
    for name in ("offline-run-1-abc", "offline-run-2-abc", "offline-run-3-abc", "offline-run-1-other", "run-4-abc"):
        (wandb_dir / name).mkdir(parents=True)
    assert read_delivered(tmp_path) == {"through_step": -1, "finished": []}
    record_delivered(tmp_path, 5, "offline-run-1-abc")
    record_delivered(tmp_path, 3, "offline-run-1-abc")  # never lowers what is held
    assert json.loads((tmp_path / DELIVERED).read_text()) == {"through_step": 5, "finished": ["offline-run-1-abc"]}
    moved = set_aside_unfinished(tmp_path, "abc", {*read_delivered(tmp_path)["finished"], "offline-run-3-abc"})
    assert moved == [tmp_path / UNFINISHED / "offline-run-2-abc"]
    assert sorted(p.name for p in wandb_dir.iterdir()) == ["offline-run-1-abc", "offline-run-1-other",
                                                           "offline-run-3-abc", "run-4-abc"]


# One attempt of a run in its own process: log the given steps through the W&B logger, then finish W&B.
ATTEMPT = (
    "import sys\n"
    "from pathlib import Path\n"
    "from osediff_lab.lit.loggers import close_logger, wandb_logger\n"
    "logger = wandb_logger(Path(sys.argv[1]), {}, project='t', mode='offline')\n"
    "for step in map(int, sys.argv[2].split(',')):\n"
    "    logger.log_metrics({'train/x': step / 10}, step=step)\n"
    "close_logger(logger)\n"
)


@pytest.mark.slow
def test_w_and_b_holds_each_journal_row_once_after_an_attempt_that_never_finished(tmp_path):
    """Attempt 1 finishes (steps 0-2); attempt 2 (3-4) is killed after W&B wrote its rows but before it could
    record that (its record undone here); attempt 3 (5): its start sets attempt 2's folder aside and sends 3-4 again."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    for steps in ("0,1,2", "3,4", "5"):
        if steps == "3,4":
            after_first = (tmp_path / DELIVERED).read_text()
        proc = subprocess.run([sys.executable, "-c", ATTEMPT, str(tmp_path), steps], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if steps == "3,4":
            (tmp_path / DELIVERED).write_text(after_first)  # killed before recording its finished run
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert [r["_step"] for r in read_history(tmp_path / UNFINISHED, run_id)] == [3, 4]  # kept, these would repeat
    assert read_delivered(tmp_path)["through_step"] == 5
    history = read_history(tmp_path / "wandb", run_id)  # what `wandb sync` of wandb/ uploads
    assert [r["_step"] for r in history] == [0, 1, 2, 3, 4, 5]
    assert history_matches_journal(history, journal_rows(tmp_path / "csv")) == []
    assert history_matches_journal([{"_step": 0, "x": 0.0}, {"_step": 0, "x": 1.0}], [(0, {"x": 1.0})])  # the checker bites
