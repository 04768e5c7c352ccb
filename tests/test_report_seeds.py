"""``report`` over seeds and reference curves, on hand-made run folders (summary.json + csv/metrics.csv): the mean +-
std per arm, the paired difference against a baseline arm per validation step and its std over seeds, each against
numbers worked out by hand; the reference envelope of three seeds and where a fourth run leaves it."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from osediff_lab import curves as cv
from osediff_lab.report import main, seeds_table

# arm -> seed -> val/psnr at steps 49 and 99 (the last one is also the run's final value)
PSNR = {"vsd": {"1": (29.0, 30.0), "2": (29.5, 30.4), "3": (28.5, 29.9)},
        "gan": {"1": (28.0, 29.0), "2": (29.0, 30.0), "3": (28.0, 29.5)}}


def make_run(root: Path, arm: str, seed: str, psnr: tuple[float, float], grad: float = 1.0) -> Path:
    """A finished run folder: its summary and its CSV journal (train rows every 10 steps, validation at 49 and 99)."""
    run_dir = root / f"{arm}_{seed}"
    (run_dir / "csv").mkdir(parents=True)
    rows = [{"step": s, "train/grad_zh_l2": grad * (1 + s / 100)} for s in range(9, 100, 10)]
    rows += [{"step": 49, "val/psnr": psnr[0]}, {"step": 99, "val/psnr": psnr[1]}]
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/grad_zh_l2", "val/psnr"])
        writer.writeheader()
        writer.writerows(rows)
    summary = {"run_dir": str(run_dir), "overrides": [f"+objective={arm}", f"seed={seed}"], "steps": 100,
               "wall_time_s": 10.0, "last_metrics": {"val/psnr": psnr[1]}, "best_metrics": {}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for arm, seeds in PSNR.items():
        for seed, psnr in seeds.items():
            make_run(tmp_path / "sweep", arm, seed, psnr)
    return tmp_path / "sweep"


def test_mean_std_and_paired_differences_by_hand(sweep):
    assert cv.mean_std([30.0, 30.4, 29.9]) == pytest.approx((30.1, math.sqrt(0.07), 3))  # deviations -0.1, 0.3, -0.2
    runs = [json.loads(p.read_text()) for p in sorted(sweep.rglob("summary.json"))]
    arms = cv.by_arm(runs, ["objective", "seed"])
    assert set(arms) == {"objective=vsd", "objective=gan"} and set(arms["objective=gan"]) == {"1", "2", "3"}
    final = cv.aggregate_final(arms, ["val/psnr"])
    assert final["objective=gan"]["val/psnr"] == pytest.approx((29.5, 0.5, 3))
    curves = {arm: {seed: cv.run_curves(r["run_dir"], ("val/psnr",))["val/psnr"] for seed, r in s.items()}
              for arm, s in arms.items()}
    diffs = cv.paired_differences(curves, "objective=vsd")
    # gan - vsd per seed: step 49: -1.0, -0.5, -0.5; step 99: -1.0, -0.4, -0.4
    assert diffs["objective=gan"][49] == pytest.approx((-2 / 3, math.sqrt(1 / 12), 3))
    assert diffs["objective=gan"][99] == pytest.approx((-0.6, math.sqrt(0.12), 3))
    table = seeds_table(runs, "objective=vsd")
    assert "| objective=gan | 3 | 29.500 ± 0.500 |" in table and "| objective=vsd | 3 | 30.100 ± 0.265 |" in table
    assert "| objective=gan | -0.667 ± 0.289 | -0.600 ± 0.346 |" in table and "step 50" in table


def test_a_missing_seed_is_left_out_of_the_pairs(sweep):
    """A seed only one arm finished pairs with nothing: the difference is over the seeds both have."""
    for p in (sweep / "vsd_3").iterdir():
        if p.is_file():
            p.unlink()
    runs = [json.loads(p.read_text()) for p in sorted(sweep.rglob("summary.json"))]
    arms = cv.by_arm(runs, ["objective", "seed"])
    curves = {arm: {seed: cv.run_curves(r["run_dir"], ("val/psnr",))["val/psnr"] for seed, r in s.items()}
              for arm, s in arms.items()}
    assert cv.paired_differences(curves, "objective=vsd")["objective=gan"][99] == pytest.approx((-0.7, math.sqrt(0.18), 2))


def test_envelope_and_first_exit_by_hand():
    env = cv.envelope([{0: 1.0, 10: 2.0, 20: 3.0}, {0: 2.0, 10: 4.0, 20: 3.0}, {0: 0.5, 10: 3.0}])
    assert env == {"steps": [0, 10], "min": [0.5, 2.0], "max": [2.0, 4.0], "mean": [3.5 / 3, 3.0]}
    assert cv.first_exit({0: 1.0, 10: 4.0}, env) is None
    assert cv.first_exit({0: 1.0, 10: 4.5}, env) == {"step": 10, "value": 4.5, "min": 2.0, "max": 4.0}
    assert cv.first_exit({0: 1.0, 10: 4.5}, env, margin=0.25) is None  # 4.5 <= 4 + 0.25 x (4 - 2)
    assert cv.first_exit({0: float("nan")}, env)["step"] == 0
    assert cv.first_exit({0: 0.1, 10: 4.5}, env, persist=2)["step"] == 0  # outside two steps running, from step 0
    assert cv.first_exit({0: 1.0, 10: 4.5}, env, persist=2) is None  # one step outside is not enough


def test_the_cli_aggregates_seeds_writes_references_and_names_where_a_run_leaves_them(sweep, tmp_path, capsys):
    for r in sweep.iterdir():  # what write_references reads: the Hydra choices of each run
        (r / ".hydra").mkdir()
        (r / ".hydra" / "hydra.yaml").write_text(
            f"hydra:\n  runtime:\n    choices:\n      model: nano\n      method: {'osediff' if 'vsd' in r.name else 'hypir'}\n")
    main([str(sweep), "--seeds", "--baseline", "objective=vsd", "--out", str(tmp_path / "results.md"),
          "--plot", str(tmp_path / "arms.png")])
    assert "30.100 ± 0.265" in (tmp_path / "results.md").read_text() and (tmp_path / "arms.png").stat().st_size > 0
    main([str(sweep), "--write-reference", str(tmp_path / "refs")])
    ref = json.loads((tmp_path / "refs" / "nano_osediff.json").read_text())
    assert ref["seeds"] == ["1", "2", "3"] and ref["quantities"]["val/psnr"]["min"] == [28.5, 29.9]
    odd = make_run(tmp_path / "odd", "vsd", "4", (29.2, 31.0), grad=1.0)
    capsys.readouterr()
    main([str(odd), "--reference", str(tmp_path / "refs" / "nano_osediff.json"), "--plot", str(tmp_path / "over.png"),
          "--margin", "0", "--persist", "1"])
    out = capsys.readouterr().out
    assert "leaves it at step 100 (val/psnr)" in out and "31 not in [29.9, 30.4]" in out
    assert (tmp_path / "over.png").stat().st_size > 0
