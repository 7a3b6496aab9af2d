"""evidence: patch_history references the evidence store instead of holding the diff

Revision ID: 0004
Revises: 0005
Create Date: 2026-12-06 12:00:00

``patch_history.patch`` (the bytes) becomes ``patch_history.patch_ref`` (a key of the
evidence store). Before this revision the ledger always wrote the same bytes to
``.ledger/patches/<sha256 of the bytes>.diff`` before the row, so each row's key is that
legacy name: nothing has to be copied. When ``orchestrator db upgrade`` knows the work dir
(``--workdir``; passed as the Alembic attribute ``evidence_root``) a copy missing there is
written from the row first, so no stored byte is lost. Copies recorded before this version
that were cut at the old 5 MiB cap stay cut (their rows say ``truncated``).

Downgrade puts the bytes back into the column from the store when ``evidence_root`` is known
(else the column is NULL again, and the store keeps the patches).
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import sqlalchemy as sa
from alembic import context, op


revision = '0004'
down_revision = '0005'
branch_labels = None
depends_on = None


def _evidence_root() -> Path | None:
    root = context.config.attributes.get("evidence_root")
    return Path(root) if root else None


def upgrade() -> None:
    with op.batch_alter_table('patch_history', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patch_ref', sa.String(length=255), nullable=True, comment='evidence-store key of the full diff (never the bytes)'))

    conn = op.get_bind()
    root = _evidence_root()
    table = sa.table('patch_history', sa.column('id', sa.Integer), sa.column('patch', sa.LargeBinary), sa.column('patch_ref', sa.String))
    rows = conn.execute(sa.select(table.c.id, table.c.patch).where(table.c.patch.is_not(None))).all()
    for row_id, data in rows:
        data = bytes(data)
        key = f"patches/{hashlib.sha256(data).hexdigest()}.diff"
        if root is not None:
            target = root / key
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
        conn.execute(sa.update(table).where(table.c.id == row_id).values(patch_ref=key))

    with op.batch_alter_table('patch_history', schema=None) as batch_op:
        batch_op.drop_column('patch')


def downgrade() -> None:
    with op.batch_alter_table('patch_history', schema=None) as batch_op:
        batch_op.add_column(sa.Column('patch', sa.LargeBinary(), nullable=True))

    root = _evidence_root()
    if root is not None:
        conn = op.get_bind()
        table = sa.table('patch_history', sa.column('id', sa.Integer), sa.column('patch', sa.LargeBinary), sa.column('patch_ref', sa.String))
        for row_id, key in conn.execute(sa.select(table.c.id, table.c.patch_ref).where(table.c.patch_ref.is_not(None))).all():
            path = root / key
            if not path.exists():
                continue
            data = gzip.decompress(path.read_bytes()) if key.endswith('.gz') else path.read_bytes()
            conn.execute(sa.update(table).where(table.c.id == row_id).values(patch=data))

    with op.batch_alter_table('patch_history', schema=None) as batch_op:
        batch_op.drop_column('patch_ref')
