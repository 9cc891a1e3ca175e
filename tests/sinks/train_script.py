"""A training job for the MLflow tests, run in a process of its own (mlflow's globals stay there).

``python train_script.py DB_URL MLFLOW_URI CASE``; prints a JSON object of run ids.
"""

import json
import sys

import mlflow
import torch
from torch import nn

from monitor.client import watch
from monitor.settings import Settings

db, uri, case = sys.argv[1:4]
mlflow.set_tracking_uri(uri)


def train(model: nn.Module, shape: tuple[int, ...], steps: int = 6, **options: object) -> str:
    """Train ``steps`` SGD steps with two parameter groups; the MLflow run apmon logged into."""
    params = list(model.parameters())
    optimizer = torch.optim.SGD(
        [{"params": params[:2], "lr": 0.05}, {"params": params[2:], "lr": 0.01}]
    )
    settings = Settings(database_url=db, mlflow_min_interval_seconds=0, mlflow_report=False)
    with watch(model, optimizer, settings=settings, **options) as mon:  # type: ignore[arg-type]
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(torch.randn(*shape)).pow(2).mean()
            loss.backward()
            optimizer.step()
            mon.record_loss(loss)
    return str(mon.wait_for_mlflow(timeout=300))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


out: dict[str, object] = {}
if case == "tracking":
    mlflow.set_experiment("mine")
    with mlflow.start_run() as active:
        out["active"] = [active.info.run_id, train(mlp(), (8, 6))]
    out["experiment"] = train(mlp(), (8, 6))  # no active run: a new run in "mine"
    own = mlflow.MlflowClient().create_run(mlflow.get_experiment_by_name("mine").experiment_id)
    out["explicit"] = [own.info.run_id, train(mlp(), (8, 6), mlflow_run_id=own.info.run_id)]
elif case == "env":  # MLFLOW_EXPERIMENT_NAME set by the caller, no set_experiment
    out["env"] = train(mlp(), (8, 6))
elif case == "resnet18":
    from torchvision.models import resnet18

    torch.manual_seed(0)
    probe = torch.randn(4, 3, 32, 32)
    out["resnet18"] = train(
        resnet18(num_classes=10),
        (4, 3, 32, 32),
        steps=4,
        apt_every=2,
        probe_set=probe,
        probe_every=2,
    )
print(json.dumps(out))
