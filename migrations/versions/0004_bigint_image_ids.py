"""64-bit image ids on PostgreSQL

Revision ID: 0004
Revises: 0003

Image ids were 32-bit INTEGER there (SQLite's INTEGER PRIMARY KEY is 64-bit already, so SQLite is
left alone). PostgreSQL rewrites the three tables to change the type, once.
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_COLUMNS = (('images', 'id'), ('embeddings', 'image_id'), ('tags', 'image_id'))


def upgrade() -> None:
    if op.get_context().dialect.name != 'postgresql':
        return
    for table, column in _COLUMNS:
        op.alter_column(table, column, type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)
    # The sequence behind images.id (SERIAL) stops at 2**31 - 1 until it is widened too.
    op.execute('ALTER SEQUENCE images_id_seq AS bigint')


def downgrade() -> None:
    if op.get_context().dialect.name != 'postgresql':
        return
    op.execute('ALTER SEQUENCE images_id_seq AS integer')
    for table, column in reversed(_COLUMNS):
        op.alter_column(table, column, type_=sa.Integer(), existing_type=sa.BigInteger(), existing_nullable=False)
