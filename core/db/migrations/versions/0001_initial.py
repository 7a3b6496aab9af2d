"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 01:25:17.180222
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapters',
    sa.Column('id', sa.String(length=63), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('breaker_state', sa.String(length=16), nullable=False),
    sa.Column('breaker_failures', sa.Integer(), nullable=False),
    sa.Column('breaker_opened_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('breaker_half_open_in_flight', sa.Integer(), nullable=False),
    sa.Column('breaker_version', sa.Integer(), nullable=False),
    sa.Column('breaker_tripped_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('breaker_updated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('breaker_window', sa.String(length=100), nullable=False),
    sa.Column('health_status', sa.String(length=16), nullable=True),
    sa.Column('health_checked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('health_message', sa.Text(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_adapters'))
    )
    op.create_table('execution_log',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('event_key', sa.String(length=255), nullable=False),
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('task_id', sa.String(length=63), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=True),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=True),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_execution_log')),
    sa.UniqueConstraint('event_key', name=op.f('uq_execution_log_event_key'))
    )
    with op.batch_alter_table('execution_log', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_execution_log_run_id'), ['run_id'], unique=False)

    op.create_table('patch_history',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('task_id', sa.String(length=63), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('adapter_id', sa.String(length=63), nullable=False),
    sa.Column('base_commit', sa.String(length=40), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('failure_class', sa.String(length=32), nullable=True),
    sa.Column('diff_sha256', sa.String(length=64), nullable=True),
    sa.Column('diff_bytes', sa.Integer(), nullable=False),
    sa.Column('files_changed', sa.Integer(), nullable=False),
    sa.Column('insertions', sa.Integer(), nullable=False),
    sa.Column('deletions', sa.Integer(), nullable=False),
    sa.Column('truncated', sa.Boolean(), nullable=False),
    sa.Column('patch', sa.LargeBinary(), nullable=True),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('entry_hash', sa.String(length=64), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_patch_history')),
    sa.UniqueConstraint('entry_hash', name=op.f('uq_patch_history_entry_hash')),
    sa.UniqueConstraint('run_id', 'task_id', 'attempt', name='uq_patch_history_attempt'),
    sa.UniqueConstraint('seq', name=op.f('uq_patch_history_seq'))
    )
    op.create_table('tasks',
    sa.Column('run_id', sa.String(length=63), nullable=False),
    sa.Column('task_id', sa.String(length=63), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False, comment='position in the phase-4 queue'),
    sa.Column('adapter_id', sa.String(length=63), nullable=False),
    sa.Column('current_adapter_id', sa.String(length=63), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('failure_class', sa.String(length=32), nullable=True),
    sa.Column('failure_message', sa.Text(), nullable=True),
    sa.Column('wait_reason', sa.Text(), nullable=True),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('pid', sa.Integer(), nullable=True, comment='process group of the live attempt'),
    sa.Column('workspace', sa.Text(), nullable=True, comment='worktree of the live attempt'),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('duration_seconds', sa.Float(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_id'], ['adapters.id'], name=op.f('fk_tasks_adapter_id_adapters')),
    sa.PrimaryKeyConstraint('run_id', 'task_id', name=op.f('pk_tasks'))
    )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tasks_status'), ['status'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tasks_status'))

    op.drop_table('tasks')
    op.drop_table('patch_history')
    with op.batch_alter_table('execution_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_execution_log_run_id'))

    op.drop_table('execution_log')
    op.drop_table('adapters')
