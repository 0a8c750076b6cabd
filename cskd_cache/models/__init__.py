"""Models: teachers, students, their heads, trained scorers on disk and the one loader of run directories.

- `teachers`: open_clip / timm / ``py:`` teachers for extraction, with their preprocessing;
- `students`: any timm or ``py:`` encoder as a `StudentEncoder` (``forward -> (pooled, grid)``);
- `align_heads`: Stage I's projection and token heads; `score_heads`: distribution and scalar score heads;
- `scorer`: `IAAModel`, the one IAA wrapper trained, scored, exported and timed, and iaa_model.* on disk;
- `cache_head`: the teacher head fitted on cached embeddings (`cskd distill --teacher cache-head`);
- `runs`: every ``run:`` spec, ``--model RUN_DIR`` and `load_encoder` goes through `build_encoder` /
  `load_encoder` / `load_run_encoder`;
- `weights`: strict safetensors loading with a one-line error; `hub`: the offline check of pretrained weights;
  `trust`: code named inside run directories runs only with ``--trust-code``; `zoo`: ready-made ``py:`` models.

May import: `errors`, `files`, `data`, `labels` (score scales), `losses`. Never: cache, train or anything above.
"""
