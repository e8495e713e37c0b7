"""The block stores: pooled feature stores and token stores, two layouts on one core.

- ``keys``: what identifies a store's contents (``request_hash``, ``fingerprint``); no Zarr,
  so the planner (``pipeline.jobs``) imports it without the stores' runtime code;
- ``core``: the block writer (create or resume, per-block flags, CRC-32C-checked chunks, the
  completion marker), the shard protocol, the run mark, the reader's checks on opening;
- ``features`` and ``tokens``: the two layouts (docs/formats.md);
- ``inputs``: the store or token set a job input names, opened and checked.
"""
