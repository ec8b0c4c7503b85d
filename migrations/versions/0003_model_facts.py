"""model facts: node names recorded at upload

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 03:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Null for models uploaded before: job creation reads their names from the file once.
    with op.batch_alter_table('models') as batch:
        batch.add_column(sa.Column('node_names', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models') as batch:
        batch.drop_column('node_names')
