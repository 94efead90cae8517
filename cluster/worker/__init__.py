"""Workers: a Ray actor hosting an engine in a role, serving the Worker and KV gRPC services."""
