"""The train stage's pieces on their own (fast, no subprocess): the epoch loop's metrics, and the
checkpoint retention setting from the deployment's environment to the stage's flag."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from embedder import loaders, loop, train
from embedder.stage import StageInputError


class Points:
    """Sixteen 4-d points in two classes: a data set small enough to train in milliseconds."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 4, generator=generator)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class Recorder:
    """Stands in for MetricLog: keeps what ``fit`` logs."""

    def __init__(self):
        self.logged: list[tuple[int, dict[str, float]]] = []

    def add(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))

    def flush(self) -> None:
        pass


def tiny_args(epochs: int, learning_rate: float) -> argparse.Namespace:
    return argparse.Namespace(epochs=epochs, learning_rate=learning_rate, weight_decay=0.0, amp="off",
                              channels_last="off", compile="off", log_every_steps=1000, checkpoint_every_steps=0,
                              progress_every_steps=1000, progress_every_s=1000.0)


def test_each_epochs_learning_rate_metric_is_the_rate_it_trained_with():
    """Cosine annealing to 0 over the epochs: the last epoch trains with a small but non-zero rate."""
    args = tiny_args(epochs=3, learning_rate=0.1)
    torch.manual_seed(0)
    trainer = loop.Trainer(nn.Linear(4, 2), args, torch.device("cpu"))
    sampler = loaders.EpochBatchSampler(16, 8, seed=0, drop_last=True)
    loader = DataLoader(loaders.SeededDataset(Points(), seed=0), batch_sampler=sampler)
    rates: list[float] = []
    original_step = trainer.optimizer.step

    def step(*a, **k):  # the rate each optimizer step actually applies
        rates.append(trainer.optimizer.param_groups[0]["lr"])
        return original_step(*a, **k)

    trainer.optimizer.step = step
    recorder = Recorder()
    last = loop.fit(trainer, loop.Progress(), args, loader, None, recorder, None, loop.StopSignal(), {})

    trained_with = [rates[0], rates[2], rates[4]]  # two steps an epoch
    assert trained_with == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
    logged = [metrics["learning_rate"] for _, metrics in recorder.logged]
    assert logged == pytest.approx(trained_with)
    assert last["learning_rate"] == pytest.approx(0.025) and last["learning_rate"] > 0


def test_the_retention_setting_reaches_the_train_stage_as_its_flag(monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    from retrain.settings import Settings, SettingsError
    from tests.dags.test_dags import DAGS, FakeTI

    assert Settings.from_env({}).checkpoint_retention_days == 7
    assert Settings.from_env({"RETRAIN_CHECKPOINT_RETENTION_DAYS": "0"}).checkpoint_retention_days == 0
    with pytest.raises(SettingsError, match="RETRAIN_CHECKPOINT_RETENTION_DAYS='-1' must be at least 0"):
        Settings.from_env({"RETRAIN_CHECKPOINT_RETENTION_DAYS": "-1"})

    monkeypatch.setenv("RETRAIN_CHECKPOINT_RETENTION_DAYS", "2.5")
    dag = DagBag(dag_folder=str(DAGS / "retrain_embedder.py")).dags["retrain_embedder"]
    op = dag.get_task("train")
    context = {"params": {k: dag.params[k] for k in dag.params}, "dag": dag, "run_id": "manual__x", "ti": FakeTI()}
    rendered = [str(a) for a in op.render_template(op.arguments, context)]
    args = train.get_args_parser().parse_args(rendered)
    assert args.checkpoint_retention_days == 2.5
    assert train.get_args_parser().parse_args(["--manifest-uri", "m", "--experiment", "e"]).checkpoint_retention_days == 7
    for bad in ("-1", "nan"):
        parsed = train.get_args_parser().parse_args(["--manifest-uri", "m", "--experiment", "e",
                                                     "--checkpoint-retention-days", bad])
        with pytest.raises(StageInputError, match="--checkpoint-retention-days must be at least 0"):
            train.validate_args(parsed)
