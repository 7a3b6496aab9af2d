"""escalations: one row per escalation raised (circuit breaker opened, gates failing
repeatedly, task timeout, adapter crash, executor unavailable)

Revision ID: 0005
Revises: 0006
Create Date: 2026-12-02 10:00:00.000000

Keyed by ``escalation_key`` (the fact that fired), so a replayed recording adds no row and
nobody is notified twice. Chained after 0006 (the integration tables).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('escalations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('escalation_key', sa.String(length=255), nullable=False),
    sa.Column('reason', sa.String(length=32), nullable=False),
    sa.Column('severity', sa.String(length=16), nullable=False),
    sa.Column('run_id', sa.String(length=63), nullable=False, server_default=''),
    sa.Column('task_id', sa.String(length=63), nullable=True),
    sa.Column('task_uid', sa.String(length=64), nullable=False, server_default=''),
    sa.Column('scope', sa.String(length=63), nullable=False, server_default=''),
    sa.Column('attempt', sa.Integer(), nullable=True),
    sa.Column('adapter_id', sa.String(length=63), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.Column('evidence', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('notified_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('notify_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_escalations')),
    sa.UniqueConstraint('escalation_key', name=op.f('uq_escalations_escalation_key'))
    )
    with op.batch_alter_table('escalations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_escalations_reason'), ['reason'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('escalations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_escalations_reason'))

    op.drop_table('escalations')
