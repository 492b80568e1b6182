"""Tokenised samples on disk: one Arrow IPC file, written chunk by chunk and read back memory-mapped.

The file holds one record batch per rendered chunk (input_ids and labels as int32 lists, and each sample's
location) and a last, empty batch whose metadata carries the RenderStats. SampleStore reads it without
loading it: a Sample is built only when asked for, so tokenised data of any size costs no heap, only
page cache (the pages the training loop touches, which the kernel can drop again).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Iterable, Sequence, overload

import numpy as np

from chattune.data.render import RenderStats, Sample, merge_stats

STATS_KEY = b"chattune_render_stats"


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())), ("where", pa.string())])


def write_samples(f: IO[bytes], chunks: Iterable[tuple[list[Sample], RenderStats]]) -> RenderStats:
    """Write each chunk's samples as one record batch and the merged stats last; returns the merged stats."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    schema = _schema()
    stats = RenderStats()
    with ipc.new_file(f, schema) as writer:
        for samples, chunk_stats in chunks:
            stats = merge_stats(stats, chunk_stats)
            if samples:
                writer.write_batch(pa.record_batch([
                    pa.array([s.input_ids for s in samples], pa.list_(pa.int32())),
                    pa.array([s.labels for s in samples], pa.list_(pa.int32())),
                    pa.array([s.where for s in samples], pa.string())], schema=schema))
        writer.write_batch(_empty(schema),
                           custom_metadata={STATS_KEY: json.dumps(asdict(stats)).encode()})
    return stats


def _empty(schema: Any) -> Any:
    import pyarrow as pa

    return pa.record_batch([pa.array([], f.type) for f in schema], schema=schema)


class SampleStore(Sequence[Sample]):
    """The samples of a write_samples file, memory-mapped; store[i] builds the i-th Sample."""

    def __init__(self, path: str | Path):
        import pyarrow as pa
        import pyarrow.ipc as ipc

        self.path = Path(path)
        reader = ipc.open_file(pa.memory_map(str(self.path), "r"))
        last = reader.num_record_batches - 1
        if last < 0:
            raise ValueError(f"{self.path}: no record batches")
        meta = reader.get_batch_with_custom_metadata(last).custom_metadata
        if meta is None or STATS_KEY not in meta:
            raise ValueError(f"{self.path}: no render stats")
        self.stats = RenderStats(**json.loads(meta[STATS_KEY]))
        self._batches = [reader.get_batch(i) for i in range(last)]
        self._starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        if self._starts[-1] != self.stats.samples:
            raise ValueError(f"{self.path}: {self._starts[-1]} samples, the stats say {self.stats.samples}")
        self._columns: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        ids, ids_at, labels, labels_at = self._arrays(b)
        r = i - int(self._starts[b])
        where = self._batches[b].column(2)[r].as_py()
        return Sample(ids[ids_at[r]:ids_at[r + 1]].tolist(), labels[labels_at[r]:labels_at[r + 1]].tolist(), where)

    def _arrays(self, b: int) -> tuple[np.ndarray, ...]:
        """Zero-copy numpy views of batch b's flat ids and labels and their offsets."""
        if b not in self._columns:
            cols = self._batches[b].columns
            self._columns[b] = tuple(a for col in cols[:2] for a in (col.values.to_numpy(), col.offsets.to_numpy()))
        return self._columns[b]

    def __reduce__(self) -> tuple[Any, tuple[Path]]:  # a DataLoader worker reopens the file instead of copying it
        return SampleStore, (self.path,)
