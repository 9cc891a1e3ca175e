"""``ApmonCallback`` for the Hugging Face ``Trainer``: ``callbacks=[ApmonCallback()]``."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from monitor.client.handle import Monitor
from monitor.integrations.steps import TrainerSteps
from monitor.settings import Settings


class ApmonCallback(TrainerCallback):  # type: ignore[misc]
    """Monitors the model a ``transformers.Trainer`` trains; takes the options of ``watch``.

    The run starts at ``on_train_begin`` on the trainer's model and optimizer (accelerate's
    ``AcceleratedOptimizer`` is unwrapped) at ``state.global_step``, so a resumed run continues
    the step count. Each optimizer step stores the mean over its micro-batches of the loss the
    model returned (``outputs.loss``, what the Trainer backpropagates and logs) and the learning
    rate the step used. With ``report_to="mlflow"`` the host logs into the Trainer's MLflow run
    (one run, not two). ``on_alert="stop"`` sets ``control.should_training_stop``.
    """

    def __init__(self, *, settings: Settings | None = None, **options: Any) -> None:
        self.steps = TrainerSteps(settings, options)
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def monitor(self) -> Monitor | None:
        """The run's monitor, once training has started."""
        return self.steps.monitor

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Start the run on the Trainer's model and optimizer."""
        if model is None or optimizer is None:
            raise ValueError("apmon needs the Trainer's model and optimizer at on_train_begin")
        self.steps.start(model, optimizer, state.global_step, _mlflow_run(args))
        self._hook = model.register_forward_hook(self._keep_loss)

    def _keep_loss(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        loss = output.get("loss") if hasattr(output, "get") else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.steps.add_loss(float(loss.detach()))

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """End the monitor's step with its loss; stop the Trainer if an alert asks to."""
        if self.steps.batch_end("mean"):
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """End the run."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.steps.close()


def _mlflow_run(args: TrainingArguments) -> tuple[str, str] | None:
    """(tracking URI, run id) of the MLflow run the Trainer's MLflowCallback started, if any."""
    if "mlflow" not in (args.report_to or []):
        return None
    import mlflow

    run = mlflow.active_run()
    return None if run is None else (mlflow.get_tracking_uri(), run.info.run_id)
