"""Archive: drains the ARCHIVE work queue into Postgres exactly once and serves history."""
