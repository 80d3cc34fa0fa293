"""chatctl: watch, decode, send and query the chat system over NATS."""
