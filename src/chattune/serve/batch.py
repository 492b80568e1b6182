"""The rows decoded together: their keys and values in one cache, left-padded to a shared width.

Every decoding step appends one column for all rows, so rows of any length share one forward pass. A new
row joins between steps: its prompt (all but the last token) is prefilled without padding elsewhere and
its keys and values are copied in right-aligned, ending where the next step writes; when its prompt is
longer than the batch's width, the batch grows on the left. A finished row leaves at once, and the
columns no remaining row uses are cut off the left. Each row keeps its own position ids, so a row's
numbers are those of the row decoded alone (up to the batch's floating-point summation order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chattune.serve.completion import Completion, TextPieces

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
SLACK = 64  # spare cache columns kept per layer, so a step writes its column instead of copying the cache


def new_cache(config: Any) -> Any:
    """A cache of SlackLayers, one per decoder layer, all keeping every column (masks do any windowing)."""
    from transformers.cache_utils import Cache

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Cache(layers=[slack_layer() for _ in range(text.num_hidden_layers)])


def slack_layer() -> Any:
    """transformers' DynamicLayer, but its keys and values are views into buffers with SLACK spare columns.

    DynamicLayer appends a step's column with torch.cat, a copy of the whole cache per layer per step
    (about 110 MB a step for SmolLM2-135M at 16 rows of 150 tokens); here the column is written in place.
    """
    from transformers.cache_utils import DynamicLayer

    class SlackLayer(DynamicLayer):
        def set(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            self.dtype, self.device, self.is_initialized, self.length = keys.dtype, keys.device, True, keys.shape[2]
            shape = (*keys.shape[:2], keys.shape[2] + SLACK, keys.shape[3])
            self._keys, self._values = keys.new_empty(shape), values.new_empty(shape)
            self._keys[:, :, :self.length] = keys
            self._values[:, :, :self.length] = values
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not self.is_initialized:
                self.set(key_states, value_states)
                return self.keys, self.values
            end = self.length + key_states.shape[2]
            if end > self._keys.shape[2]:
                self.set(self.keys, self.values)  # a new buffer with fresh slack
            self._keys[:, :, self.length:end] = key_states
            self._values[:, :, self.length:end] = value_states
            self.length = end
            self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
            return self.keys, self.values

    return SlackLayer()


@dataclass(eq=False)  # rows are compared by identity
class Row:
    """One completion being decoded: the token to feed next, its position, where its keys start."""

    completion: Completion
    pieces: TextPieces
    adapter: str | None
    next_token: int
    position: int
    start: int = 0
    generator: Any = None


class Batch:
    """The running rows and their shared key/value cache (a transformers DynamicCache we lay out ourselves)."""

    def __init__(self, model: Any, config: Any):
        self.model, self.config = model, config
        self.rows: list[Row] = []
        self.cache: Any = None
        self.width = 0
        self._active: str | None = None  # the adapter last set on the model (set_adapter walks every module)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Row], states: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Join rows; states[i][layer] = (keys, values) of row i's prompt prefix, each [kv_heads, n, dim]."""
        need = max(1, max(s[0][0].shape[1] for s in states))  # one masked column when every prefix is empty
        if self.cache is None:
            self.cache, self.width = new_cache(self.config), 0
        grow = max(0, need - self.width)
        for r in self.rows:
            r.start += grow
        self.width += grow
        for index in range(len(states[0])):
            keys = self._right_aligned([s[index][0] for s in states])
            values = self._right_aligned([s[index][1] for s in states])
            layer = self.cache.layers[index]
            if layer.is_initialized:
                keys, values = torch.cat([_pad_left(layer.keys, grow), keys]), torch.cat([_pad_left(layer.values, grow), values])
            layer.set(keys, values)
        for r, s in zip(rows, states):
            r.start = self.width - s[0][0].shape[1]
        self.rows.extend(rows)

    def _right_aligned(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = parts[0].new_zeros((len(parts), parts[0].shape[0], self.width, parts[0].shape[2]))
        for i, p in enumerate(parts):
            if p.shape[1]:
                out[i, :, self.width - p.shape[1]:] = p
        return out

    def step(self) -> torch.Tensor:
        """One forward pass for every row; returns the next-token logits [rows, vocab] in float32."""
        device = self.cache.layers[0].keys.device
        ids = torch.tensor([[r.next_token] for r in self.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[r.position] for r in self.rows], dtype=torch.long, device=device)
        mask = torch.zeros((len(self.rows), self.width + 1), dtype=torch.long, device=device)
        for i, r in enumerate(self.rows):
            mask[i, r.start:] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1, **self._adapters())
        self.width += 1
        for r in self.rows:
            r.position += 1
        return out.logits[:, -1, :].float()

    def _adapters(self) -> dict[str, Any]:
        names = {r.adapter for r in self.rows}
        if names == {None}:
            return {}
        if len(names) == 1 and BASE_ADAPTER not in names:
            name = next(iter(names))
            if name != self._active or name not in self.model.active_adapters:
                self.model.set_adapter(name)  # one adapter: peft's plain path, no per-row split
                self._active = name
            return {}
        return {"adapter_names": [r.adapter for r in self.rows]}

    def remove(self, gone: list[Row]) -> None:
        """Rows leave; the left columns no remaining row reads are cut."""
        if not gone:
            return
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache, self.width = None, 0
            return
        cut = min(r.start for r in self.rows)
        index = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.set(layer.keys.index_select(0, index)[:, :, cut:], layer.values.index_select(0, index)[:, :, cut:])
        for r in self.rows:
            r.start -= cut
        self.width -= cut


def _pad_left(states: torch.Tensor, n: int) -> torch.Tensor:
    if not n:
        return states
    return torch.cat([states.new_zeros((*states.shape[:2], n, states.shape[3])), states], dim=2)
