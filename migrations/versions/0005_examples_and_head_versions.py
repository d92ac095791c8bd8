"""examples labelled by people, and every version of a head

Revision ID: 0005
Revises: 0004

`example_sets` / `examples`: the images a person labelled for a head, through the API or the page
(a head is taught from them). `head_versions`: each training's weights, so an earlier version can
be made current again; `heads.version` says which one the head's own weights are. The index of
tags by label alone goes.
"""

from alembic import op
import sqlalchemy as sa

# Spelled out, not imported from indexer.models: a migration stays as it was written.
_IMAGE_ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('example_sets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('positive', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('examples',
    sa.Column('set_id', sa.Integer(), nullable=False),
    sa.Column('image_id', _IMAGE_ID, nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['images.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['set_id'], ['example_sets.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('set_id', 'image_id')
    )
    op.create_table('head_versions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('head_id', sa.Integer(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('weights', sa.LargeBinary(), nullable=False),
    sa.Column('thresholds', sa.JSON(), nullable=False),
    sa.Column('min_confidence', sa.Float(), nullable=False),
    sa.Column('score_floor', sa.Float(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['head_id'], ['heads.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('head_id', 'number')
    )
    # A plain ADD COLUMN: a batch copy of `heads` would drop the table, and with foreign keys on,
    # SQLite's implicit DELETE would take every tag with it (ON DELETE CASCADE).
    op.add_column('heads', sa.Column('version', sa.Integer(), nullable=True))
    # Unused since filters run on in-memory postings; every tag written or deleted paid for it
    # (100k tags of a head re-trained from the page: 0.2 s of its 0.75 s write).
    op.drop_index('ix_tags_label', table_name='tags')


def downgrade() -> None:
    op.create_index('ix_tags_label', 'tags', ['label'], unique=False)
    with op.batch_alter_table('heads', schema=None) as batch_op:
        batch_op.drop_column('version')
    op.drop_table('head_versions')
    op.drop_table('examples')
    op.drop_table('example_sets')
