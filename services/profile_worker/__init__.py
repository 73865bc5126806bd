"""The profile worker: applies the event log to user profiles (its own process)."""
