"""escalation events: when the operator posted an escalation's Kubernetes Warning Events

Revision ID: 0007
Revises: 0004
Create Date: 2026-12-08 10:00:00

``escalations.event_posted_at``: the operator posts each escalation of a namespace it serves
as Warning Events (on the TaskExecution, and on the Adapter for breaker escalations) from its
event loop, after the row is written; a row without the stamp is posted on the next chance,
also after a restart (see ``core.kube.escalation_events``). Rows recorded before this
revision are stamped with their creation time: nobody posted them, and an hour-old Event
would only be noise now.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('escalations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('event_posted_at', sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE escalations SET event_posted_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table('escalations', schema=None) as batch_op:
        batch_op.drop_column('event_posted_at')
