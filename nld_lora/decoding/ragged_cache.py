"""RaggedCache: preallocated KV storage where every batch row has its own length.

transformers' StaticCache writes all rows at one shared `cache_position`; self-speculation accepts a different number
of drafts per row, so here each row writes its new tokens at its own offset (its current length). Rejected drafts
and draft-only forwards need no crop and no compaction: their slots lie past the row's length and the next write
overwrites them. Prompts are left-aligned, so a row's slot s holds the token at position s and the attention mask
follows from the lengths alone (`nld_lora.model.masks.ragged_mask`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class RaggedLayer(CacheLayerMixin):
    """One decoder layer's keys and values, (batch, kv_heads, capacity, head_dim), written at per-row offsets."""

    is_sliding = False

    def __init__(self, owner: RaggedCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, heads, _, dim = key_states.shape
        self._store(key_states.new_zeros(rows, heads, self.owner.capacity, dim),
                    value_states.new_zeros(rows, heads, self.owner.capacity, value_states.shape[-1]))
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.owner.write(self.keys, key_states)
        self.owner.write(self.values, value_states)
        window = self.owner.window
        return self.keys[:, :, :window], self.values[:, :, :window]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.window, 0

    def get_seq_length(self) -> int:
        return self.owner.window

    def get_max_length(self) -> int:
        return self.owner.capacity

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Adopt new storage; with static shapes it is marked static (CUDA graphs write into it in place, as into
        transformers' StaticCache, instead of copying it in on every replay)."""
        self.keys, self.values = keys, values
        if self.owner.static:
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def select_rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self._store(self.keys.index_select(0, index), self.values.index_select(0, index))

    def append_rows(self, other: RaggedLayer) -> None:
        """Append another layer's rows, both padded to this owner's capacity."""
        if not other.is_initialized:
            return
        keys, values = self._padded(other.keys), self._padded(other.values)
        if self.is_initialized:
            keys, values = torch.cat([self._padded(self.keys), keys]), torch.cat([self._padded(self.values), values])
        else:
            self.device, self.is_initialized = keys.device, True
        self._store(keys, values)

    def _padded(self, store: torch.Tensor) -> torch.Tensor:
        """store with its slot dimension grown to the owner's capacity (as is when it already has it)."""
        grow = self.owner.capacity - store.shape[2]
        return torch.nn.functional.pad(store, (0, 0, 0, grow)) if grow else store


class RaggedCache(Cache):
    """A transformers Cache whose next forward writes row b's q new tokens at slots start[b] .. start[b] + q - 1.

    `begin(starts, q)` is called before every forward; attention then reads slots [0, max(start) + q), or with
    static=True every slot, through index tensors only: shapes then depend on (rows, q) alone, as CUDA graphs need.
    """

    def __init__(self, num_layers: int, capacity: int, static: bool = False):
        self.capacity = capacity
        self.static = static
        self.window = 0
        self._uniform_start: int | None = 0
        self._index: torch.Tensor | None = None  # (rows, 1, q, 1) slot of each new token, for ragged writes
        self._q = 0
        super().__init__(layers=[RaggedLayer(self) for _ in range(num_layers)])

    def begin(self, starts: list[int], q: int, device: torch.device) -> None:
        """Set where the next forward's q tokens go: row b at slots starts[b] + (0..q-1)."""
        end = max(starts) + q
        if end > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} slots; this forward needs {end}")
        self.window = self.capacity if self.static else end
        self._q = q
        if min(starts) == end - q and not self.static:
            self._uniform_start, self._index = end - q, None
        else:
            self._uniform_start = None
            slots = torch.tensor(starts, device=device)[:, None] + torch.arange(q, device=device)
            self._index = slots[:, None, :, None]

    def write(self, store: torch.Tensor, new: torch.Tensor) -> None:
        if self._uniform_start is not None:
            store[:, :, self._uniform_start:self._uniform_start + self._q] = new
        else:
            store.scatter_(2, self._index.expand(-1, new.shape[1], -1, new.shape[-1]), new)

    def append_rows(self, other: RaggedCache) -> None:
        """Append another cache's rows (a batch joining this one); the capacity becomes the larger of the two."""
        self.capacity = max(self.capacity, other.capacity)
        for mine, theirs in zip(self.layers, other.layers):
            mine.append_rows(theirs)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only these batch rows."""
        for layer in self.layers:
            layer.select_rows(index)
