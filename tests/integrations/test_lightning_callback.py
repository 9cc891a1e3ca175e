"""``monitor.integrations.lightning.ApmonCallback`` in a real ``lightning.Trainer.fit``.

Every stored loss, unit count and APT D is checked against a manual loop that trains a copy of
the same network on the same batches and recomputes the patterns with plain tensor code.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import mlflow
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from monitor.integrations.lightning import ApmonCallback
from monitor.schema import StepSummary
from monitor.settings import Settings
from monitor.store import open_store
from tests.client.memory_transport import ListTransport
from tests.client.test_step_semantics import (
    BATCH,
    AlertingTransport,
    changed,
    data,
    mlp,
    oracle_masks,
    train_summaries,
    unit_on,
)

LR = 0.5


class Lit(pl.LightningModule):
    """An MLP in a LightningModule; ``training_step`` calls ``self.net`` or ``self``."""

    def __init__(self, call: str = "submodule", manual: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp()
        self.call = call
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x) if self.call == "submodule" else self(x), y)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def lr_scalars(summary: StepSummary) -> dict[str, float]:
    """The summary's lr/group<i> scalars (it carries the inputs' scale too)."""
    return {k: v for k, v in (summary.scalars or {}).items() if k.startswith("lr/")}


def loader(batches: int) -> DataLoader[Any]:
    xs, ys = zip(*(data(i) for i in range(batches)), strict=True)
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=BATCH)


def trainer(callback: ApmonCallback, steps: int, accumulate: int = 1, **extra: Any) -> pl.Trainer:
    options: dict[str, Any] = {"logger": False, "enable_checkpointing": False}
    options.update(extra)
    return pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        **options,
    )


def reference(steps: int, accumulate: int, reduce: str) -> dict[str, list[Any]]:
    """The same training in a plain loop; each step's loss, oracle unit counts and D counts."""
    torch.manual_seed(0)
    net = mlp()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    out: dict[str, list[Any]] = {"loss": [], "unit_on": [], "apt": []}
    for step in range(steps):
        batches = [data(step * accumulate + i) for i in range(accumulate)]
        before = [oracle_masks(net, x, "net.") for x, _ in batches]
        optimizer.zero_grad()
        losses = []
        for x, y in batches:
            loss = F.cross_entropy(net(x), y)
            (loss / accumulate).backward()
            losses.append(float(loss) / accumulate if reduce == "sum" else float(loss))
        optimizer.step()
        out["loss"].append(sum(losses) if reduce == "sum" else sum(losses) / len(losses))
        out["unit_on"].append(
            {site: sum(b[site].sum(0) for b in before).tolist() for site in before[0]}
        )
        out["apt"].append(changed(before[-1], oracle_masks(net, batches[-1][0], "net.")))
    return out


@pytest.mark.parametrize(
    ("call", "manual", "accumulate"),
    [("submodule", False, 1), ("self", False, 2), ("submodule", False, 2), ("self", True, 1)],
    ids=["automatic-submodule", "automatic-accumulate", "submodule-accumulate", "manual"],
)
def test_fit_stores_the_manual_loops_values(call: str, manual: bool, accumulate: int) -> None:
    steps = 4
    transport = ListTransport()
    callback = ApmonCallback(transport=transport, every=1, apt_every=1)
    module = Lit(call, manual)
    trainer(callback, steps, accumulate).fit(module, loader(steps * accumulate))
    expected = reference(steps, accumulate, "mean" if manual else "sum")
    summaries = train_summaries(transport)
    assert [s.step for s in summaries] == list(range(steps))
    assert [s.loss for s in summaries] == pytest.approx(expected["loss"], rel=1e-5)
    assert [unit_on(s) for s in summaries] == expected["unit_on"]
    apt = [{s.site: s.changed[0] for s in p.sites} for p in transport.probes_of("apt")]
    assert apt == expected["apt"]
    assert [p.step for p in transport.probes_of("apt")] == list(range(steps))
    # Every parameter group's learning rate rides on each step's summary (MLflow's lr/group0).
    # (beside the inputs' input/rms and input/max_abs)
    assert all(lr_scalars(s) == {"lr/group0": LR} for s in summaries)
    assert transport.finished == steps - 1


def test_resume_continues_the_step_count(tmp_path: Path) -> None:
    first = ListTransport()
    module = Lit()
    fit = trainer(ApmonCallback(transport=first, every=1), 3)
    fit.fit(module, loader(6))
    fit.save_checkpoint(tmp_path / "three.ckpt")
    second = ListTransport()
    trainer(ApmonCallback(transport=second, every=1), 5).fit(
        Lit(), loader(6), ckpt_path=tmp_path / "three.ckpt"
    )
    assert [s.step for s in train_summaries(first)] == [0, 1, 2]
    assert [s.step for s in train_summaries(second)] == [3, 4]


def test_stop_policy_stops_the_trainer() -> None:
    callback = ApmonCallback(transport=AlertingTransport(at=1), every=1, on_alert="stop")
    fit = trainer(callback, 8)
    fit.fit(Lit(), loader(8))
    assert fit.global_step == 2  # the alert came at the end of step 1


def test_embedded_run_logs_into_the_loggers_mlflow_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real host, SQLite store and MLflow: one MLflow run, the manual loop's D, no alert."""
    steps, accumulate = 12, 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'apmon.db'}",
        mlflow_tracking_uri="",
        mlflow_min_interval_seconds=0.0,
        alert_wait_seconds=60.0,
    )
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="lit", tracking_uri=uri)
    callback = ApmonCallback(settings=settings, every=1, apt_every=1)
    with caplog.at_level(logging.WARNING, logger="monitor"):
        trainer(callback, steps, accumulate, logger=logger).fit(Lit(), loader(steps * accumulate))
    monitor = callback.monitor
    assert monitor is not None and monitor.alerts == []
    monitor.wait_for_mlflow(timeout=300)  # the host finishes MLflow after close()
    store = open_store(settings.database_url)
    run = store.run(monitor.run_id)
    assert run.status == "finished"
    assert run.mlflow_run_id == logger.run_id
    expected = reference(steps, accumulate, "sum")
    stored: dict[int, dict[str, int]] = {}
    for point in store.probes(monitor.run_id):
        if point.kind == "apt":
            stored.setdefault(point.step, {})[point.site] = point.changed
    assert [stored[step] for step in range(steps)] == expected["apt"]
    assert store.alerts(monitor.run_id) == []
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=10
    )
    assert [r.info.run_id for r in runs] == [logger.run_id]  # one run, not two
    for _ in range(100):  # the loggers may still be writing
        if "train/loss" in client.get_run(logger.run_id).data.metrics:
            break
        time.sleep(0.1)
    history = client.get_metric_history(logger.run_id, "train/loss")
    assert [m.step for m in history][-1] == steps - 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
