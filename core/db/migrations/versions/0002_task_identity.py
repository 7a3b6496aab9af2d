"""task identity: tasks keyed by (run, task, uid), adapters and breakers by (scope, id)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 16:00:00

Existing rows keep their keys: they get ``uid = ''`` and ``scope = ''`` (the embedded
backend's identity). A TaskExecution that was recorded under its name alone before this
migration is recorded under its uid from now on; its old rows stay as history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_constraint('fk_tasks_adapter_id_adapters', type_='foreignkey')

    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.add_column(sa.Column('scope', sa.String(length=63), nullable=False, server_default=''))
        batch_op.drop_constraint('pk_adapters', type_='primary')
        batch_op.create_primary_key('pk_adapters', ['scope', 'id'])

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('uid', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('scope', sa.String(length=63), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('attempt_started_at', sa.DateTime(timezone=True), nullable=True, comment='when the live attempt started (an interrupted one is charged from here)'))
        batch_op.add_column(sa.Column('attempt_timeout_seconds', sa.Float(), nullable=True, comment='the budget granted to the live attempt'))
        batch_op.drop_constraint('pk_tasks', type_='primary')
        batch_op.create_primary_key('pk_tasks', ['run_id', 'task_id', 'uid'])
        batch_op.create_foreign_key('fk_tasks_adapter', 'adapters', ['scope', 'adapter_id'], ['scope', 'id'])

    with op.batch_alter_table('execution_log', schema=None) as batch_op:
        batch_op.add_column(sa.Column('task_uid', sa.String(length=64), nullable=False, server_default=''))

    with op.batch_alter_table('patch_history', schema=None) as batch_op:
        batch_op.add_column(sa.Column('task_uid', sa.String(length=64), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('scope', sa.String(length=63), nullable=False, server_default=''))
        batch_op.drop_constraint('uq_patch_history_attempt', type_='unique')
        batch_op.create_unique_constraint('uq_patch_history_attempt', ['run_id', 'task_id', 'task_uid', 'attempt'])


def downgrade() -> None:
    """Only possible while no two identities share a (run, task) or an adapter id."""
    with op.batch_alter_table('patch_history', schema=None) as batch_op:
        batch_op.drop_constraint('uq_patch_history_attempt', type_='unique')
        batch_op.create_unique_constraint('uq_patch_history_attempt', ['run_id', 'task_id', 'attempt'])
        batch_op.drop_column('scope')
        batch_op.drop_column('task_uid')

    with op.batch_alter_table('execution_log', schema=None) as batch_op:
        batch_op.drop_column('task_uid')

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_constraint('fk_tasks_adapter', type_='foreignkey')
        batch_op.drop_constraint('pk_tasks', type_='primary')
        batch_op.create_primary_key('pk_tasks', ['run_id', 'task_id'])
        batch_op.drop_column('attempt_timeout_seconds')
        batch_op.drop_column('attempt_started_at')
        batch_op.drop_column('scope')
        batch_op.drop_column('uid')

    with op.batch_alter_table('adapters', schema=None) as batch_op:
        batch_op.drop_constraint('pk_adapters', type_='primary')
        batch_op.create_primary_key('pk_adapters', ['id'])
        batch_op.drop_column('scope')

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_foreign_key('fk_tasks_adapter_id_adapters', 'adapters', ['adapter_id'], ['id'])
