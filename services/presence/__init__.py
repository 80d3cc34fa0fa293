"""Presence: who is online across all gateways, crash-safe in a JetStream KV bucket."""
