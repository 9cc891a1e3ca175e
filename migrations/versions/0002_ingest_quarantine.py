"""ingest quarantine and batch digests

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 11:20:00

``ingest_batches.digest`` (SHA-256 of the batch as received) tells a retry from a conflicting
batch under the same seq; ``ingest_batches.error`` marks a batch that was quarantined because it
could not be processed when its turn came, and says why.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ingest_batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("digest", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ingest_batches", schema=None) as batch_op:
        batch_op.drop_column("error")
        batch_op.drop_column("digest")
