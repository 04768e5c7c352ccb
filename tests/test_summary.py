"""The parameter summary that replaces Lightning's model summary: counts against hand-counted toy modules,
frozen parts collapsed, optimiser groups named, and the tiny OSEDiff's totals against its parameter groups."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from torch import nn

from helpers import TINY, compose_config
from osediff_lab.lit.summary import ParameterSummary, count, group_rows, module_rows, parameter_summary


class Toy(nn.Module):
    """a.x: Linear(4, 3) trained (15); a.y: Linear(3, 2) frozen in bf16 (8); b: frozen, two levels deep (10 + 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ModuleDict({"x": nn.Linear(4, 3), "y": nn.Linear(3, 2).to(torch.bfloat16).requires_grad_(False)})
        self.b = nn.Sequential(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2))).requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(1))


def test_rows_count_by_hand_and_collapse_frozen_parts():
    assert module_rows(Toy(), depth=2) == [("(own)", 1, 0, []), ("a.x", 15, 0, []), ("a.y", 0, 8, [torch.bfloat16]),
                                           ("b", 0, 16, [torch.float32])]
    assert module_rows(Toy(), depth=1) == [("(own)", 1, 0, []), ("a", 15, 8, [torch.bfloat16]), ("b", 0, 16, [torch.float32])]
    assert [count(n) for n in (950, 12_345, 4_500_000, 1_234_567_890)] == ["950", "12.3 K", "4.5 M", "1.2 B"]


def test_groups_are_named_in_optimiser_order_with_their_learning_rates():
    toy = Toy()
    opts = [torch.optim.AdamW(toy.a.x.parameters(), lr=1e-4), torch.optim.SGD([toy.scale], lr=0.5)]
    assert group_rows(opts, ["generator", "other"]) == [("generator", 2, 15, 1e-4), ("other", 1, 1, 0.5)]
    assert [r[0] for r in group_rows(opts, [])] == ["optimizer 0", "optimizer 1"]
    text = parameter_summary(toy, opts, ["generator", "other"], depth=2)
    assert "Total: 16 trained (16), 24 frozen (24)" in text and "bfloat16" in text


class ToyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.toy = Toy()
        self.groups = {"main": None}

    def training_step(self, batch, batch_idx):
        return self.toy.a["x"](batch[0]).sum() * self.toy.scale.sum()

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_the_callback_logs_once_on_fit_start_in_place_of_lightnings_summary(caplog, tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[ParameterSummary(depth=3)], default_root_dir=tmp_path)
    with caplog.at_level(logging.INFO):
        trainer.fit(ToyModule(), data)
    (text,) = [r.getMessage() for r in caplog.records if r.name == "osediff_lab.lit.summary"]
    assert "main" in text and "toy.a.x" in text and "Total: 16 trained (16), 24 frozen (24)" in text
    assert "FLOPs" not in caplog.text and "Mode" not in caplog.text


def test_tiny_osediff_totals_equal_its_parameter_groups(tmp_path):
    from osediff_lab.train import build_module

    module = build_module(compose_config(TINY, tmp_path))
    trained = sum(t for _, t, _, _ in module_rows(module, 3))
    frozen = sum(f for _, _, f, _ in module_rows(module, 3))
    in_groups = {id(p): p.numel() for g in module.groups.values() for p in g.params}
    assert trained == sum(in_groups.values()) == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert frozen == sum(p.numel() for p in module.parameters() if not p.requires_grad) > 0
    names = [name for name, *_ in module_rows(module, 3)]
    assert "method.generator.unet" in names and "method.lpips" in names  # the frozen LPIPS collapsed to one row
