"""The persisted state of a migration: SQLite schema, the state machines, and the durable store."""
