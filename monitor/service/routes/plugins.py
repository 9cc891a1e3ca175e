"""The measure plugins this service runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from monitor.service.api import PluginOut
from monitor.service.auth import Project
from monitor.service.state import Services, services

router = APIRouter(prefix="/api/v1/plugins", tags=["plugins"])


@router.get("", summary="Loaded plugins with name and version, in processing order")
def list_plugins(svc: Annotated[Services, Depends(services)], _project: Project) -> list[PluginOut]:
    """Every plugin the host runs, dependencies first."""
    return [
        PluginOut(name=p.name, version=p.version, requires=list(p.requires))
        for p in svc.registry.ordered()
    ]
