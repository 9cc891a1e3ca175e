"""``monitor.integrations.hf.ApmonCallback`` in a real ``transformers.Trainer.train``.

A tiny BERT-style classifier with ReLU feed-forward layers, built from a config (no download).
A second callback snapshots the parameters before and after each optimizer step; the oracle
recomputes each site's patterns from those snapshots with plain forward hooks on the ReLUs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from monitor.integrations.hf import ApmonCallback
from monitor.schema import StepSummary
from monitor.settings import Settings
from monitor.store import open_store
from tests.client.memory_transport import ListTransport
from tests.client.test_step_semantics import train_summaries, unit_on

ROWS, TOKENS, LR = 4, 6, 0.5


def lr_scalars(summary: StepSummary) -> dict[str, float]:
    """The summary's lr/group<i> scalars (it carries the inputs' scale too)."""
    return {k: v for k, v in (summary.scalars or {}).items() if k.startswith("lr/")}


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_act="relu",
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + i)
    return {
        "input_ids": torch.randint(0, 40, (ROWS, TOKENS), generator=g),
        "labels": torch.randint(0, 3, (ROWS,), generator=g),
    }


class Rows(IterableDataset[dict[str, torch.Tensor]]):
    """The rows of ``batch(0)``, ``batch(1)``, ... in order (no sampler, no shuffling)."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(self.batches):
            b = batch(i)
            for r in range(ROWS):
                yield {key: value[r] for key, value in b.items()}


class Snapshots(TrainerCallback):  # type: ignore[misc]
    """The model's state before each optimizer step, and after the last."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.states.append(copy.deepcopy(model.state_dict()))

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.states.append(copy.deepcopy(model.state_dict()))


def oracle_masks(state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Preactivation > 0 of every ReLU of the BERT at ``state``, by forward hooks."""
    model = tiny_bert()
    model.load_state_dict(state)
    masks: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            module.register_forward_hook(
                lambda _m, args, _o, name=name: masks.__setitem__(f"{name}#0", args[0] > 0)
            )
    with torch.no_grad():
        model(input_ids=inputs["input_ids"])
    return masks


def oracle_loss(state: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> float:
    model = tiny_bert()
    model.load_state_dict(state)
    with torch.no_grad():
        return float(model(**inputs).loss)


def arguments(tmp_path: Path, steps: int, accumulate: int, **extra: Any) -> TrainingArguments:
    options: dict[str, Any] = {"report_to": [], "learning_rate": LR, "save_strategy": "no"}
    options.update(extra)
    return TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=ROWS,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        **options,
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_train_stores_the_oracles_values(tmp_path: Path, accumulate: int) -> None:
    steps = 3
    transport = ListTransport()
    callback = ApmonCallback(transport=transport, every=1, apt_every=1)
    snapshots = Snapshots()
    trainer = Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, steps, accumulate),
        train_dataset=Rows(steps * accumulate),
        callbacks=[callback, snapshots],
    )
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"  # unwrapped by watch
    assert callback.monitor is not None
    assert callback.monitor.optimizer is trainer.optimizer.optimizer
    summaries = train_summaries(transport)
    assert [s.step for s in summaries] == list(range(steps))
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    # The mean over the step's micro-batches of the model's loss at theta_t. The Trainer logs
    # the sum instead for a model that accepts loss kwargs but ignores them (BERT here).
    losses = [
        sum(
            oracle_loss(snapshots.states[step], batch(step * accumulate + i))
            for i in range(accumulate)
        )
        / accumulate
        for step in range(steps)
    ]
    assert [s.loss for s in summaries] == pytest.approx(losses, rel=1e-5)
    assert logged == pytest.approx([loss * accumulate for loss in losses], rel=1e-4)
    # Every parameter group's learning rate rides on each step's summary (MLflow's lr/group<i>):
    # the HF Trainer makes two groups, with and without weight decay.
    assert all(lr_scalars(s) == {"lr/group0": LR, "lr/group1": LR} for s in summaries)
    expected_apt, expected_on = [], []
    for step in range(steps):
        micro = [batch(step * accumulate + i) for i in range(accumulate)]
        before = [oracle_masks(snapshots.states[step], b) for b in micro]
        after = oracle_masks(snapshots.states[step + 1], micro[-1])
        expected_apt.append(
            {site: int((before[-1][site] != after[site]).any(-1).sum()) for site in after}
        )
        expected_on.append(
            {
                site: sum(m[site].reshape(-1, m[site].shape[-1]).sum(0) for m in before).tolist()
                for site in after
            }
        )
    assert len(expected_apt[0]) == 2  # both layers' ReLU sites
    apt = [{s.site: s.changed[0] for s in p.sites} for p in transport.probes_of("apt")]
    assert apt == expected_apt
    assert sum(sum(c.values()) for c in expected_apt) > 0
    assert [unit_on(s) for s in summaries] == expected_on


def test_stop_policy_stops_the_trainer(tmp_path: Path) -> None:
    from tests.client.test_step_semantics import AlertingTransport

    callback = ApmonCallback(transport=AlertingTransport(at=1), every=1, on_alert="stop")
    trainer = Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, 6, 1),
        train_dataset=Rows(6),
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.state.global_step == 2  # the alert came at the end of step 1


def test_embedded_run_logs_into_the_trainers_mlflow_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf")
    mlflow.set_tracking_uri(uri)
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'apmon.db'}",
        mlflow_tracking_uri="",
        mlflow_min_interval_seconds=0.0,
        alert_wait_seconds=60.0,
    )
    steps = 8
    callback = ApmonCallback(settings=settings, every=1, apt_every=1)
    trainer = Trainer(
        model=tiny_bert(),
        # lr 0.5 makes this BERT's every token change pattern within a few steps: a true
        # divergence alert. 0.05 trains it calmly.
        args=arguments(tmp_path, steps, 2, report_to=["mlflow"], learning_rate=0.05),
        train_dataset=Rows(steps * 2),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING, logger="monitor"):
        trainer.train()
    monitor = callback.monitor
    assert monitor is not None and monitor.alerts == []
    monitor.wait_for_mlflow(timeout=300)  # the host finishes MLflow after close()
    store = open_store(settings.database_url)
    run = store.run(monitor.run_id)
    assert run.status == "finished" and store.alerts(monitor.run_id) == []
    assert {p.step for p in store.probes(monitor.run_id)} == set(range(steps))
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run.mlflow_run_id]  # one run, not two
    for _ in range(100):
        if "train/loss" in client.get_run(run.mlflow_run_id).data.metrics:
            break
        time.sleep(0.1)
    assert [m.step for m in client.get_metric_history(run.mlflow_run_id, "train/loss")][-1] == 7
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_resume_from_checkpoint_continues_the_step_count(tmp_path: Path) -> None:
    first = ListTransport()
    args = arguments(tmp_path, 2, 1, save_strategy="steps", save_steps=2)
    Trainer(
        model=tiny_bert(),
        args=args,
        train_dataset=Rows(4),
        callbacks=[ApmonCallback(transport=first, every=1)],
    ).train()
    second = ListTransport()
    Trainer(
        model=tiny_bert(),
        args=arguments(tmp_path, 4, 1, save_strategy="no"),
        train_dataset=Rows(4),
        callbacks=[ApmonCallback(transport=second, every=1)],
    ).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert [s.step for s in train_summaries(first)] == [0, 1]
    assert [s.step for s in train_summaries(second)] == [2, 3]
