"""Torch-free pieces that the engine and the router share (the router process imports no engine):
request sampling parameters, the KV block hash chain, where models live on disk."""
