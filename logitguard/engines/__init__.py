"""Engines: where the one apply path (`logitguard.defenses.apply`) runs over a whole table.

- `stream`: in this process, batch by batch (memory bounded by the batch, not the table): ``inspect``,
  ``correct``, ``evaluate``, ``detect``, ``defend``, ``guard apply``;
- `ray`: on Ray Data, on one machine or a cluster (``--engine ray``; the 'ray' extra), split by job;
- `report`: the one report path, from the per-row decisions every engine collects (`RowKeys`).

Engines only move batches: they read them (`logitguard.tables`), hand each to `apply_batch`, write what it
returns and collect its `Decision` per row; the numbers they report come from `report` alone.
"""
