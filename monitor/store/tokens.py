"""Projects' API tokens: created once in plain text, stored hashed."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from monitor.store.models import ApiTokenRow, ProjectRow
from monitor.store.session import SqlBase


def hash_token(token: str) -> str:
    """SHA-256 of a token: tokens are random and long, so a fast hash is the right one."""
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens(SqlBase):
    """API tokens of projects."""

    def create_token(self, project: str, label: str = "") -> str:
        """Create an API token for the project; the plain token is returned once, never stored."""
        token = "apm_" + secrets.token_urlsafe(32)
        with self._session("create token") as session:
            project_id = self._project_id(session, project, create=True)
            session.add(
                ApiTokenRow(project_id=project_id, token_hash=hash_token(token), label=label)
            )
        return token

    def project_for_token(self, token: str) -> str | None:
        """The name of the project a valid, unrevoked token belongs to, else None."""
        with self._session("check token") as session:
            return session.scalar(
                select(ProjectRow.name)
                .join(ApiTokenRow, ApiTokenRow.project_id == ProjectRow.id)
                .where(
                    ApiTokenRow.token_hash == hash_token(token), ApiTokenRow.revoked_at.is_(None)
                )
            )
