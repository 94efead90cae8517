"""Block hash chains of token sequences, computed exactly as the engine's block manager does.

The router's prefix index (Redis) is keyed by these hashes and the workers publish the same
ones: both sides take them from `pdcommon.block_hash` (torch-free, so the router imports no engine).
"""
from pdcommon.block_hash import NO_HASH, hash_block, prefix_block_hashes

__all__ = ["NO_HASH", "hash_block", "prefix_block_hashes"]
