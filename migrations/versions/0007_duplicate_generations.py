"""duplicate checks numbered by generation

Revision ID: 0007
Revises: 0006

`duplicate_generations`: one row per committed duplicate check, numbered in commit order, with a
random token. `duplicate_checks.generation`: the check that compared the image. A process that
keeps every pixel signature in memory reads the images checked since the generation it saw
instead of reading them all again, and notices a database restored or replaced under it (the
generation's token differs). Checks made before this revision have none: they were read in full.
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('duplicate_generations',
    sa.Column('generation', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('token', sa.String(length=32), nullable=False),
    sa.Column('made_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('generation')
    )
    with op.batch_alter_table('duplicate_checks') as batch:
        batch.add_column(sa.Column('generation', sa.BigInteger(), nullable=True))
        batch.create_index('ix_duplicate_checks_generation', ['generation'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('duplicate_checks') as batch:
        batch.drop_index('ix_duplicate_checks_generation')
        batch.drop_column('generation')
    op.drop_table('duplicate_generations')
