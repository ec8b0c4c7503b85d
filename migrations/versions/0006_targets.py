"""workers (class, pool, CPU and load, kept fresh by heartbeats); jobs: target, queues, pending measurements

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'workers',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('hostname', sa.String(length=255), nullable=False),
        sa.Column('pid', sa.Integer(), nullable=False),
        sa.Column('worker_class', sa.String(length=64), nullable=False),
        sa.Column('pool', sa.String(length=64), nullable=True),
        sa.Column('architecture', sa.String(length=32), nullable=False),
        sa.Column('features', sa.JSON(), nullable=False),
        sa.Column('cores', sa.Integer(), nullable=False),
        sa.Column('concurrency', sa.Integer(), nullable=False),
        sa.Column('running', sa.Integer(), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('stopped_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_workers')),
    )
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_workers_worker_class'), ['worker_class'], unique=False)
        batch_op.create_index(batch_op.f('ix_workers_last_seen_at'), ['last_seen_at'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('target', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('queues', sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column('measurements_pending', sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.create_index(batch_op.f('ix_jobs_measurements_pending'), ['measurements_pending'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_measurements_pending'))
        batch_op.drop_column('measurements_pending')
        batch_op.drop_column('queues')
        batch_op.drop_column('target')
    with op.batch_alter_table('workers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_workers_last_seen_at'))
        batch_op.drop_index(batch_op.f('ix_workers_worker_class'))
    op.drop_table('workers')
