"""Cluster state in Redis: registry, heartbeats, prefix index, rate limits (one module owns the keys)."""
