"""session leases

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 06:50:00

One row per session naming the orchestrator process that runs it (``holder`` = host:pid:token)
and until when (``expires_at``); a NULL holder is a free lease. Written by hand from
orchestrator.store.schema.SessionLease: a new table only, so existing rows are untouched and
the downgrade drops nothing but the leases.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'session_leases',
        sa.Column('session_id', sa.String(length=32), nullable=False),
        sa.Column('holder', sa.String(length=300), nullable=True),
        sa.Column('host', sa.String(length=255), nullable=True),
        sa.Column('pid', sa.Integer(), nullable=True),
        sa.Column('acquired_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('renewed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(['session_id'], ['sessions.id'], name=op.f('fk_session_leases_session_id_sessions'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('session_id', name=op.f('pk_session_leases')),
    )


def downgrade() -> None:
    op.drop_table('session_leases')
