"""Alembic environment: the caller owns the engine and passes a connection.

``probe.store.open_store`` runs ``upgrade head`` with ``config.attributes["connection"]``
set; ``alembic`` on the command line is not used, so there is no ``alembic.ini``.
"""

from alembic import context

from schema.tables import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
