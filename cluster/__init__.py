"""pdserve cluster layer: CLI and launcher, workers, KV transport, router, planner and cluster state."""
