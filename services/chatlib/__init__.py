"""Shared runtime of the chat services: names, codec, settings, NATS wiring, lifecycle."""
