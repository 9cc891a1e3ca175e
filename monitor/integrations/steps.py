"""What both trainer callbacks share: one monitor, ended step by step with the trainer's loss."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from monitor.client.handle import Monitor, watch
from monitor.settings import Settings

logger = logging.getLogger(__name__)


class TrainerSteps:
    """Runs ``watch(model, optimizer, **options)`` and ends its steps from trainer callbacks.

    The trainer reports each micro-batch's loss (``add_loss``) and each batch's end
    (``batch_end``); a batch in which ``optimizer.step()`` ran ends the monitor's step with the
    step's loss and learning rate (scalar ``lr``: the first parameter group's rate that the step
    used). ``should_stop`` is the ``on_alert="stop"`` policy's request.
    """

    def __init__(self, settings: Settings | None, options: dict[str, Any]) -> None:
        self.settings = settings
        self.options = options
        self.monitor: Monitor | None = None
        self._losses: list[float] = []
        self._step = 0

    def start(
        self,
        model: nn.Module,
        optimizer: Any,
        global_step: int,
        mlflow: tuple[str, str] | None,
    ) -> Monitor:
        """Start the run at the trainer's step; ``mlflow`` is (tracking URI, run id) to log into."""
        settings = self.settings or Settings()
        options = dict(self.options)
        if mlflow is not None and "transport" not in options and not settings.server_url:
            uri, run_id = mlflow
            settings = settings.model_copy(update={"mlflow_tracking_uri": uri})
            options.setdefault("mlflow_run_id", run_id)
        options.setdefault("start_step", global_step)
        self.monitor = watch(model, optimizer, settings=settings, **options)
        self.monitor.hold_step_ends()
        self._step = self.monitor.step
        self._losses = []
        return self.monitor

    def add_loss(self, value: float | None) -> None:
        """One micro-batch's loss (None: none was computed)."""
        if value is not None:
            self._losses.append(value)

    def batch_end(self, reduce: str = "mean") -> bool:
        """End the monitor's step if one ran; whether the trainer should stop.

        ``reduce`` turns the micro-batch losses into the step's: "mean" or "sum" (for losses
        already divided by the number of micro-batches).
        """
        monitor = self.monitor
        if monitor is None or monitor.step == self._step:
            return False
        self._step = monitor.step
        losses, self._losses = self._losses, []
        loss = None
        if losses:
            loss = sum(losses) if reduce == "sum" else sum(losses) / len(losses)
        monitor.end_step(loss)
        return monitor.should_stop

    def close(self) -> None:
        """End the run (idempotent)."""
        if self.monitor is not None:
            self.monitor.close()
