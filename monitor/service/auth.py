"""Bearer-token auth: every API route needs a project's token, and sees only that project's runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from monitor.service.state import Services, services
from monitor.store import NotFound
from monitor.store.entities import RunInfo

_bearer = HTTPBearer(auto_error=False, description="An apmon API token (apmon tokens create).")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def require_project(
    svc: Annotated[Services, Depends(services)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The project of the request's token; 401 without a valid one."""
    if credentials is None or not credentials.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API token: send 'Authorization: Bearer <token>'",
            headers=_CHALLENGE,
        )
    token = credentials.credentials
    project = svc.tokens.get(token)
    if project is None:
        project = svc.store.project_for_token(token)
        if project is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "invalid or revoked API token", headers=_CHALLENGE
            )
        svc.tokens.put(token, project)
    return project


Project = Annotated[str, Depends(require_project)]


def project_run(svc: Services, project: str, run_id: str) -> RunInfo:
    """The run when it belongs to ``project``, else 404.

    Another project's run answers exactly like a missing one, so ids of other projects cannot
    even be probed.
    """
    try:
        run = svc.store.run(run_id)
    except NotFound:
        run = None
    if run is None or run.project != project:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run with id {run_id!r}")
    return run
