"""``ApmonCallback`` for Lightning: ``Trainer(callbacks=[ApmonCallback(apt_every=8)])``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from monitor.client.handle import Monitor
from monitor.integrations.steps import TrainerSteps
from monitor.settings import Settings


class ApmonCallback(pl.Callback):
    """Monitors the LightningModule being fitted; takes the options of ``watch``.

    The run starts at ``on_train_start`` on the first optimizer (``trainer.optimizers[0]``) and
    at ``trainer.global_step``, so a resumed fit continues the step count. Each optimizer step
    stores the loss Lightning backpropagated (automatic optimization: the sum over the step's
    micro-batches of the ``training_step`` loss divided by ``accumulate_grad_batches``; manual
    optimization: the mean of the returned losses) and the learning rate the step used. With
    an ``MLFlowLogger`` the host logs into that logger's run (one run, not two).
    ``on_alert="stop"`` sets ``trainer.should_stop``. Only the first optimizer is watched.
    """

    def __init__(self, *, settings: Settings | None = None, **options: Any) -> None:
        super().__init__()
        self.steps = TrainerSteps(settings, options)

    @property
    def monitor(self) -> Monitor | None:
        """The run's monitor, once training has started."""
        return self.steps.monitor

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the run on the module and its first optimizer."""
        self.steps.start(
            pl_module, trainer.optimizers[0], trainer.global_step, _mlflow_run(trainer)
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Record the micro-batch's loss; end the step if the optimizer stepped."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.steps.add_loss(float(loss.detach()))
        reduce = "sum" if pl_module.automatic_optimization else "mean"
        if self.steps.batch_end(reduce):
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End the run."""
        self.steps.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """End the run when fitting fails (an ``on_alert="raise"`` alert included)."""
        self.steps.close()


def _mlflow_run(trainer: pl.Trainer) -> tuple[str, str] | None:
    """(tracking URI, run id) of the trainer's MLFlowLogger, if it has one."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return str(logger.experiment.tracking_uri), str(logger.run_id)
    return None
