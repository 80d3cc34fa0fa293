"""Development tooling: embedded NATS and Postgres servers, `make up`, process helpers.

Used by `make up` and by the test harness, never by the services themselves.
"""
