"""The PostgreSQL front end (docs/postgres.md): the v3 wire protocol and SQL on the engine."""
