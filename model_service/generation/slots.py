"""The decoder's keys and values of a running batch in preallocated buffers (a transformers Cache).

transformers' DynamicCache concatenates every layer's keys and values at every decode step, a
copy of the whole cache per token (with 32 rows of a GPT-2-small-sized model, 10-20 % of a
step on CPU). SlotCache keeps one buffer per layer, [row capacity, heads, column capacity,
head dim], and a step writes only the new column:

- rows 0..rows-1 are the batch's rows, in its order;
- columns [start, end) are in use; every row's tokens end at column `end` (left padding), and
  `mask` ([row capacity, column capacity]) marks each row's own columns;
- a decode step writes every row's new keys and values at column `end` and attends over
  [start, end + 1): views of the buffers, no copy;
- `add_rows` copies a prefilled batch's keys and values in, right-aligned at `end`;
- `keep_rows` moves the last rows into the holes the leaving ones left (only moved rows are
  copied) and drops columns no remaining row uses.
When a buffer is full it is re-laid out (twice the rows then running, so it also shrinks after
many rows left; half as many columns again, or exactly the columns the rows may still need,
`room`, where that is at most as many again), so copies are amortized and rows that joined
together and generate no more tokens than their window is wide are not re-laid out while they
decode (bench_generation's 32-row waves were once each: a copy of the whole cache). Columns
of the window a row does not own hold zeros or an earlier row's values: always finite, and
masked, so they weigh exactly zero.
"""

from __future__ import annotations

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's buffers; the layout (rows, start, end) is its SlotCache's."""

    is_sliding = False

    def __init__(self, owner: SlotCache):  # noqa: D107 - no super().__init__: `keys` / `values` are views here
        self.owner = owner
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        o = self.owner
        return self.key_buffer[:o.rows, :, o.start:o.end]

    @property
    def values(self) -> torch.Tensor:
        o = self.owner
        return self.value_buffer[:o.rows, :, o.start:o.end]

    def lazy_initialization(self, key_states, value_states) -> None:
        raise RuntimeError("SlotCache layers are filled by add_rows, not by a prefill forward pass")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the step's keys and values at column `end`; the keys and values to attend over."""
        o = self.owner
        width = key_states.shape[-2]
        self.key_buffer[:o.rows, :, o.end:o.end + width] = key_states
        self.value_buffer[:o.rows, :, o.end:o.end + width] = value_states
        return (self.key_buffer[:o.rows, :, o.start:o.end + width],
                self.value_buffer[:o.rows, :, o.start:o.end + width])

    def get_seq_length(self) -> int:
        return self.owner.end - self.owner.start

    def get_mask_sizes(self, query) -> tuple[int, int]:
        """(kv length, kv offset) for `query`: its length (transformers 5.x) or its cache positions (4.x)."""
        return self.get_seq_length() + (query if isinstance(query, int) else int(query.shape[0])), 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.x's name for get_max_length
        return -1


class SlotCache(Cache):
    def __init__(self, num_layers: int):
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])
        self.rows = self.start = self.end = 0
        self.mask: torch.Tensor | None = None  # [row capacity, column capacity], 1 where a row has a token

    @property
    def attention_mask(self) -> torch.Tensor:
        """[rows, end - start]: the rows' own columns."""
        return self.mask[:self.rows, self.start:self.end]

    def _relayout(self, rows: int, width: int, kv=None, room: int | None = None) -> None:
        """New buffers for `rows` rows and a window of `width` columns (more capacity to grow); the
        window in use moves so that it ends at column `width`. `kv`: a layer's new rows, which give
        the buffers' shapes when there are none yet; `room`: the columns the rows may still need
        (their tokens left to feed), where known."""
        used = self.end - self.start
        row_cap = max(rows, 2 * self.rows)  # room for as many rows again; shrinks after rows left
        grow = max(16, width // 2)
        if room is not None and room <= max(16, width):  # what the rows still need, at most twice the window
            grow = max(1, room)
        col_cap = width + grow
        start = width - used
        like = kv[0][0] if kv else self.layers[0].key_buffer
        mask = torch.zeros((row_cap, col_cap), dtype=torch.long, device=like.device)
        if self.mask is not None:
            mask[:self.rows, start:width] = self.attention_mask
        for i, layer in enumerate(self.layers):
            old = (layer.key_buffer, layer.value_buffer)
            shapes = [t.shape for t in (old if old[0] is not None else kv[i])]
            # Not zeroed (a large share of a re-layout's cost): add_rows zeroes what enters the window.
            new = [torch.empty((row_cap, shape[1], col_cap, shape[3]), dtype=like.dtype, device=like.device)
                   for shape in shapes]
            if old[0] is not None:
                for fresh, buffer in zip(new, old, strict=True):
                    fresh[:self.rows, :, start:width] = buffer[:self.rows, :, self.start:self.end]
            layer.key_buffer, layer.value_buffer = new
        self.mask, self.start, self.end = mask, start, width

    def add_rows(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                 room: int | None = None) -> None:
        """Append rows: `kv` per layer (keys, values) [k, heads, p, dim], left-padded as `mask` [k, p];
        `room`: as for _relayout, of every row after the append."""
        count, width = mask.shape
        if self.mask is None or self.rows + count > self.mask.shape[0] or self.end < width:
            self._relayout(self.rows + count, max(self.end - self.start, width), kv, room)
        rows, first = slice(self.rows, self.rows + count), self.end - width
        start = min(self.start, first)
        self.mask[rows] = 0
        self.mask[rows, first:self.end] = mask
        for layer, (keys, values) in zip(self.layers, kv, strict=True):
            for buffer, new in ((layer.key_buffer, keys), (layer.value_buffer, values)):
                # Every column of the window holds finite values for every row (masked ones weigh 0 only then).
                buffer[rows, :, start:first] = 0
                buffer[:self.rows, :, start:self.start] = 0
                buffer[rows, :, first:self.end] = new
        self.rows += count
        self.start = start

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Keep rows `keep` (the others leave): rows past the new count move into the holes.
        Returns the new order: entry i is the old index of the row now at i."""
        count = len(keep)
        kept = set(keep)
        holes = [i for i in range(count) if i not in kept]
        movers = [i for i in keep if i >= count]
        order = list(range(count))
        if movers:
            for hole, mover in zip(holes, movers, strict=True):
                order[hole] = mover
            to = torch.tensor(holes, dtype=torch.long, device=self.mask.device)
            src = torch.tensor(movers, dtype=torch.long, device=self.mask.device)
            window = slice(self.start, self.end)
            for buffer in [self.mask, *(b for layer in self.layers for b in (layer.key_buffer, layer.value_buffer))]:
                part = buffer[:, :, window] if buffer.dim() == 4 else buffer[:, window]
                part.index_copy_(0, to, part.index_select(0, src))
        self.rows = count
        if count:
            used = self.attention_mask.any(0)
            self.start += int(used.nonzero()[0])  # columns only departed rows used
        return order

    def next_column(self, room: int | None = None) -> torch.Tensor:
        """Before a decode step: mark every row's new column; the attention mask the step uses.
        `room`: as for _relayout."""
        if self.end == self.mask.shape[1]:
            self._relayout(self.rows, self.end - self.start, room=room)
        self.mask[:self.rows, self.end] = 1
        return self.mask[:self.rows, self.start:self.end + 1]

    def advance(self, width: int = 1) -> None:
        """After a decode step's forward pass: its column is part of the window."""
        self.end += width
