"""population responses

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 06:52:00

A trial's population response as one typed binary array (little-endian float32 or float64,
NaN = masked unit) with its unit and masked counts: BLOB on SQLite, BYTEA on PostgreSQL.
Written by hand from orchestrator.store.schema.PopulationResponse; a new table only.
"""
from __future__ import annotations

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table(
        'population_responses',
        sa.Column('trial_id', sa.Integer(), nullable=False),
        sa.Column('n_units', sa.Integer(), nullable=False),
        sa.Column('n_masked', sa.Integer(), nullable=False),
        sa.Column('dtype', sa.String(length=8), nullable=False),
        sa.Column('data', sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("dtype IN ('float32', 'float64')", name=op.f('ck_population_responses_dtype')),
        sa.ForeignKeyConstraint(['trial_id'], ['trials.id'], name=op.f('fk_population_responses_trial_id_trials'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('trial_id', name=op.f('pk_population_responses')),
    )


def downgrade() -> None:
    op.drop_table('population_responses')
