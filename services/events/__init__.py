"""The shared event log (NATS JetStream): ingested events, dead letters, tombstones."""
