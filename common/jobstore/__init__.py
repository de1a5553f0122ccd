"""The job store: tables (models.py), engine and sessions (db.py), queries (queries.py)."""
