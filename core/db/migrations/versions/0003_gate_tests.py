"""gate_test_results: per-test outcomes of the test gate and the flake history

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 16:00:00.000000

Rows carry the task's identity (run, task, uid, scope) like every other table since 0002.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('gate_test_results',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('task_id', sa.String(length=63), nullable=False),
    sa.Column('task_uid', sa.String(length=64), nullable=False, server_default=''),
    sa.Column('scope', sa.String(length=63), nullable=False, server_default=''),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('check_name', sa.String(length=63), nullable=False),
    sa.Column('test_key', sa.String(length=64), nullable=False),
    sa.Column('test_id', sa.Text(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gate_test_results')),
    sa.UniqueConstraint('run_id', 'task_id', 'task_uid', 'attempt', 'check_name', 'test_key', 'outcome', name='uq_gate_test_results_attempt')
    )
    with op.batch_alter_table('gate_test_results', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_gate_test_results_outcome'), ['outcome'], unique=False)
        batch_op.create_index(batch_op.f('ix_gate_test_results_test_key'), ['test_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('gate_test_results', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_gate_test_results_test_key'))
        batch_op.drop_index(batch_op.f('ix_gate_test_results_outcome'))

    op.drop_table('gate_test_results')
