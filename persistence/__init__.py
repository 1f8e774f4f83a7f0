"""PostgreSQL: models, migrations, the connection pool and every SQL statement."""
