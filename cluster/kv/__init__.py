"""KV transfer between workers: layout identity, leases, the KV gRPC service, NIXL and gRPC transports."""
