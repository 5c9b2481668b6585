"""Automatic prefix caching: K/V of full token blocks that earlier prefills computed, found again by the
tokens that lead up to them.

A block is `block_size` tokens; its key chains the key of the block before it with its own tokens, so a
key names a whole prefix (the same block after different prefixes gets different keys). Blocks are copies
(the cache manager's `SeqKV` of block_size tokens: K/V [layers, 2, kv_heads, block_size, head_dim], with
int8 scales) taken out of a sequence's buffer after its
prefill computed them, and copied into a new sequence's buffer when its prompt starts with them: the
engine's per-sequence buffers stay contiguous, so attention and the C decode kernels (`native_rows`)
read them unchanged. A cached block holds exactly what a prefill without the cache would compute for it:
the engine keeps prompts' blocks, and answers' blocks only where decode writes the same K/V as prefill
(model_runner.py `step_rows`).

With `partial` (the engine's row path, where K/V never depend on how tokens were grouped) matching is
token-granular past the last whole block, as a radix tree's: the first block that does not match whole
gives the longest run of leading tokens any cached block under the same parent shares with it (a block a
longer prompt filled, or the last, partial block of a finished sequence, which the engine then keeps too).

The cache manager counts blocks against the same token budget as live sequences and evicts them least
recently used first, before any live sequence is preempted.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass
class Block:
    parent: int | None  # the key of the block before it (None: the first block)
    tokens: tuple[int, ...]  # block_size of them, or fewer for a sequence's last, partial block
    kv: Any  # cache_manager.SeqKV of block_size tokens (the first len(tokens) hold K/V)


class PrefixCache:
    def __init__(self, block_size: int = 16, partial: bool = False) -> None:
        self.block_size = block_size
        self.partial = partial  # token-granular matching past the last whole block (module docstring)
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.children: dict[int | None, set[int]] = {}  # parent key -> keys of the blocks after it
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found cached

    @property
    def num_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def chain(self, ids: list[int], n_tokens: int, tail: bool = False) -> list[tuple[int, int | None, tuple[int, ...]]]:
        """(key, parent key, tokens) of each full block among the first n_tokens of ids, and with `tail` of
        the partial block after them (when n_tokens is not a whole number of blocks)."""
        out, parent, b = [], None, self.block_size
        for start in range(0, n_tokens if tail else n_tokens - b + 1, b):
            tokens = tuple(ids[start:min(start + b, n_tokens)])
            key = hash((parent, tokens))
            out.append((key, parent, tokens))
            parent = key
        return out

    def touch(self, keys: list[int]) -> None:
        """Mark blocks recently used; a prefix's first block is reused whenever any later block is, so the
        later blocks are evicted first."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def match(self, ids: list[int], limit: int) -> tuple[list[Any], tuple[Any, int] | None]:
        """K/V blocks of the longest cached prefix of ids, at most `limit` tokens (marked recently used): the
        whole blocks, and with `partial` a block of which the next n tokens are cached, as (kv, n), or None."""
        found, keys, parent = [], [], None
        for key, par, tokens in self.chain(ids, limit):
            block = self.blocks.get(key)
            if block is None or block.parent != par or block.tokens != tokens:
                break
            found.append(block.kv)
            keys.append(key)
            parent = key
        part = None
        if self.partial:
            start = len(found) * self.block_size
            want = ids[start:min(limit, start + self.block_size)]
            best, best_key = 0, None
            for key in self.children.get(parent, ()):
                tokens = self.blocks[key].tokens
                n = 0
                while n < min(len(tokens), len(want)) and tokens[n] == want[n]:
                    n += 1
                if n > best:
                    best, best_key = n, key
            if best_key is not None:
                part = (self.blocks[best_key].kv, best)
                keys.append(best_key)
        self.touch(keys)
        return found, part

    def count(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def add(self, key: int, parent: int | None, tokens: tuple[int, ...], kv: Any) -> None:
        self.blocks[key] = Block(parent, tokens, kv)
        self.children.setdefault(parent, set()).add(key)

    def evict(self) -> bool:
        """Drop the least recently used block; False when there is none."""
        if not self.blocks:
            return False
        key, block = self.blocks.popitem(last=False)
        siblings = self.children[block.parent]
        siblings.discard(key)
        if not siblings:
            del self.children[block.parent]
        return True
