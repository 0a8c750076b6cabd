"""Images and the views cut from them: decoding, view geometry, rendering, image sources and the training Dataset.

- `images`: `load_rgb` (EXIF, alpha over white, size limits), content digests, `RowImages` (digest-checked reads);
- `views`: a view's 5 numbers, the seeded view policy, `render` (this box of this image at this input size and
  normalisation: the one function every stage renders with);
- `transforms`: the eval view and the mild augmentations of Stage II;
- `sources`: scanning folders and list files into planned image items;
- `extract_views`: every view of one image from one decode (the extractor's reader);
- `datasets`: `CachedViews`, the one Dataset align, finetune and distill train on, and `StepBatches`.

Knows nothing of the cache format: arrays (boxes, embeddings, digests) and a streamed-array reader are handed in.
May import: `errors`, `files`. Never: cache, labels, models, train or anything above.
"""
