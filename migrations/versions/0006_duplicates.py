"""duplicates across the collection: links found by the scan, what was checked, people's decisions

Revision ID: 0006
Revises: 0005

`duplicate_links`: pairs of images at a tier (identical, copy, near) with their score.
`duplicate_checks`: which images (at which content) the scan compared with the collection.
`duplicate_distinct` / `duplicate_keeps`: "not duplicates" and "keep this one", kept across scans
and re-indexing.
"""

from alembic import op
import sqlalchemy as sa

# Spelled out, not imported from indexer.models: a migration stays as it was written.
_IMAGE_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def _pair_table(name: str, *columns: sa.Column) -> None:
    op.create_table(name,
    sa.Column('a_id', _IMAGE_ID, nullable=False),
    sa.Column('b_id', _IMAGE_ID, nullable=False),
    *columns,
    sa.ForeignKeyConstraint(['a_id'], ['images.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['b_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('a_id', 'b_id')
    )


def upgrade() -> None:
    _pair_table('duplicate_links',
        sa.Column('tier', sa.String(length=16), nullable=False),
        sa.Column('score', sa.Float(), nullable=False),
        sa.Column('cosine', sa.Float(), nullable=True))
    op.create_index('ix_duplicate_links_b', 'duplicate_links', ['b_id'], unique=False)
    _pair_table('duplicate_distinct', sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False))
    op.create_table('duplicate_checks',
    sa.Column('image_id', _IMAGE_ID, nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=True),
    sa.Column('checked_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id')
    )
    op.create_table('duplicate_keeps',
    sa.Column('image_id', _IMAGE_ID, nullable=False),
    sa.Column('members', sa.JSON(), nullable=False),
    sa.Column('decided_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id')
    )


def downgrade() -> None:
    op.drop_table('duplicate_keeps')
    op.drop_table('duplicate_checks')
    op.drop_table('duplicate_distinct')
    op.drop_index('ix_duplicate_links_b', table_name='duplicate_links')
    op.drop_table('duplicate_links')
