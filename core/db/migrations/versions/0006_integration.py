"""integrations, integration_tasks: the integration worker's branch per run and its verdicts

Revision ID: 0006
Revises: 0003
Create Date: 2026-11-30 10:00:00.000000

New tables only: nothing existing changes. ``integration_tasks`` carries the task's identity
(run, task, uid, scope) like every table since 0002, and the ledger seq/hash of the verdict's
entry (the anchor ``orchestrator ledger verify`` checks the ledger's tail against).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0006'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('integrations',
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('scope', sa.String(length=63), nullable=False, server_default=''),
    sa.Column('source', sa.Text(), nullable=False, comment="the tasks' repository (path or URL)"),
    sa.Column('repository', sa.Text(), nullable=False, comment='the repository holding the branch'),
    sa.Column('branch', sa.String(length=255), nullable=False),
    sa.Column('base_commit', sa.String(length=40), nullable=False),
    sa.Column('head_commit', sa.String(length=40), nullable=False),
    sa.Column('pushed_to', sa.Text(), nullable=True),
    sa.Column('pushed_commit', sa.String(length=40), nullable=True),
    sa.Column('gate_runs', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('batches', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('run_id', 'scope', name=op.f('pk_integrations'))
    )
    op.create_table('integration_tasks',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('task_id', sa.String(length=63), nullable=False),
    sa.Column('task_uid', sa.String(length=64), nullable=False, server_default=''),
    sa.Column('scope', sa.String(length=63), nullable=False, server_default=''),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.String(length=63), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('commit', sa.String(length=40), nullable=True),
    sa.Column('parent_commit', sa.String(length=40), nullable=False),
    sa.Column('base_commit', sa.String(length=40), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False, server_default=''),
    sa.Column('reopened', sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column('batch', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('gate_runs', sa.Integer(), nullable=False, server_default='0'),
    sa.Column('ledger_seq', sa.Integer(), nullable=False),
    sa.Column('entry_hash', sa.String(length=64), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_integration_tasks')),
    sa.UniqueConstraint('entry_hash', name=op.f('uq_integration_tasks_entry_hash')),
    sa.UniqueConstraint('ledger_seq', name=op.f('uq_integration_tasks_ledger_seq')),
    sa.UniqueConstraint('run_id', 'task_id', 'task_uid', 'attempt', name='uq_integration_tasks_attempt')
    )
    with op.batch_alter_table('integration_tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_integration_tasks_run_id'), ['run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('integration_tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_integration_tasks_run_id'))

    op.drop_table('integration_tasks')
    op.drop_table('integrations')
