"""The paged KV cache: specs, groups, one block pool (vLLM v1's hybrid design, our way).

- **Spec** (spec.py): the model declares what one layer stores per block (`KVCacheSpec`: named
  tensors with dtype and shape, the attention kind, block size, `page_size_bytes` with
  everything included). Every byte figure of the cache is derived from it, in spec.py only.
- **Groups** (layout.py): layers, or ranges of their KV heads, that share a spec and a policy
  form a `KVCacheGroup`. Groups are cut to one shape, so a block of any group costs the same
  bytes and one budget buys one number of blocks.
- **Pool** (block_pool.py): `BlockPool` owns every block's ref count, hash, owner and group,
  the prefix-cache hash map keyed by (hash, group), the O(1) LRU free queue and the events. A
  block id addresses one group's layers at a time.
- **Managers** (group_manager.py, manager.py): per group, which blocks each request needs, as
  one block table per group; `KVCacheManager` keeps the groups in step (all-or-nothing
  allocation, a prefix hit common to every group). A manager may give blocks back mid-request:
  the null block takes the slot and attention masks it.
- **Storage** (storage.py): the tensors, head-major, shared by the groups page for page.

Request 7 with two groups (layers 0-14 and 15-29), 40 tokens, block size 16:

    group 0 (layers 0-14)   table [ 3 | 8 | 12 ]     pool blocks 3, 8, 12 hold layers 0-14
    group 1 (layers 15-29)  table [ 5 | 9 | 13 ]     pool blocks 5, 9, 13 hold layers 15-29
                                    ^ tokens 0-15, 16-31, 32-39 (block 12/13 partly filled)

    a window group after giving its first block back:  [ null | 9 | 13 ]

    storage k: [layer position 0..14][kv head][page 0..N (N = null)][token in block][head dim]
               group 0's layer 3 and group 1's layer 18 both read position 3, in their own pages
"""

from engine.kv_cache.block_pool import ROOT_HASH, BlockPool, hash_block, hash_hex
from engine.kv_cache.layout import PolicyError, make_groups, parse_policy
from engine.kv_cache.manager import BlockTables, KVCacheManager
from engine.kv_cache.spec import KVCacheGroup, KVCacheSpec, TensorSpec, full_attention_spec

# storage.py (the tensors) is imported from its module: everything here is torch-free, so a
# RunConfig can size a cache without loading torch.
__all__ = [
    "ROOT_HASH", "BlockPool", "BlockTables", "KVCacheGroup", "KVCacheManager", "KVCacheSpec",
    "PolicyError", "TensorSpec", "full_attention_spec", "hash_block", "hash_hex", "make_groups",
    "parse_policy",
]
