"""pdserve cluster layer: CLI now; workers, KV transport, router, planner and state later."""
