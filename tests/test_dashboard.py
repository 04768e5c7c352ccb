"""Dashboards, offline: the W&B workspace definition generated from a study's experiment config, and the
report's list of failed and missing runs beside its table."""

from __future__ import annotations

import json

from osediff_lab.dashboard import workspace_definition
from osediff_lab.report import main as report_main
from osediff_lab.report import record_failure, unfinished_runs


def test_workspace_of_a_study_has_its_group_arms_val_curves_and_tables(tmp_path):
    out = tmp_path / "ws.json"
    report_main(["--wandb-workspace", "ablate_rank", "--out", str(out)])
    ws = json.loads(out.read_text())
    assert ws["runset"]["filters"]["group"] == "ablate_rank"
    assert ws["arms"] == {"generator.lora.vae_rank": ["2", "4", "8"], "generator.lora.unet_rank": ["4"]}
    sections = {s["name"]: s["panels"] for s in ws["sections"]}
    val = sections["validation"]
    assert {p["y"][0] for p in val} == {"val/psnr", "val/ssim"} and all(p["x"] == "trainer/global_step" for p in val)
    assert all(p["group_by"] == ["config.overrides.generator/lora/vae_rank", "config.overrides.generator/lora/unet_rank"]
               for p in val)
    (table,) = sections["validation images"]
    assert table["key"] == "val/images" and table["columns"][2:5] == ["LQ", "SR", "HQ"]
    assert "train/loss_vsd" in {p["y"][0] for p in sections["training"]}
    assert workspace_definition("ablate_vsd")["arms"] == {"method": ["osediff", "osediff_no_vsd", "osediff_vsd_image"]}


def test_report_lists_failed_and_missing_runs_beside_the_table(tmp_path, capsys):
    for n, overrides in enumerate(["- method.vsd_weight=1\n", "- method.vsd_weight=-1\n", "- method.vsd_weight=2\n"]):
        (tmp_path / str(n) / ".hydra").mkdir(parents=True)
        (tmp_path / str(n) / ".hydra" / "overrides.yaml").write_text(overrides)
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"overrides": ["method.vsd_weight=1"], "steps": 4}))
    try:
        raise ValueError("method.vsd_weight=-1 is negative")
    except ValueError as exc:
        record_failure(tmp_path / "1", exc)
    runs = {r["run_dir"].rsplit("/", 1)[1]: r for r in unfinished_runs(tmp_path)}
    assert runs["1"]["status"] == "failed" and runs["1"]["reason"] == "ValueError: method.vsd_weight=-1 is negative"
    assert runs["2"]["status"] == "missing" and "0" not in runs
    report_main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "2 run(s) without a result" in printed
    assert "| 1 | method.vsd_weight=-1 | failed | ValueError: method.vsd_weight=-1 is negative |" in printed
