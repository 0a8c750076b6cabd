"""The feature cache, the central contract (docs/cache-format.md): what `cskd extract` writes and every later stage reads.

- `manifest`: manifest.json, the schema version and the fingerprint of what produced the rows;
- `shards`: writing HDF5 shards (sizes, free space, atomic completion);
- `reader`: `open_cache`, the rows in RAM (keys, boxes, embeddings) and `StreamedArrays` for tokens kept on disk;
- `integrity` / `verify`: the per-open fast checks, the one-time sha256, `cskd cache verify`;
- `lock`: the O_EXCL writer lock and the temporaries of dead writers;
- `paths`: where a cache's images are now (``--cache-image-root`` remaps, existence and digest checks);
- `stats`: statistics over rows, in chunks (the standardised global target);
- `view_store`: the optional view-pixel stores beside a cache (each cached view's pixels as JPEG): the format,
  reading, finding one that covers a student, verifying.

May import: `errors`, `files`, `data` (image digests, the jitter's bounds). Never: labels, models, train or anything above.
"""
