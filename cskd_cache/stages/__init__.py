"""The pipeline's stages, each a command: `extract` (the cache), `add_views` (a cache's view-pixel store),
`align` (Stage I), `finetune` and `distill` (Stage II), plus what they alone use: `view_pixels` (store or
originals, per run), `align_eval` (held-out alignment metrics), `iaa_task` (Stage II's config and
engine task, shared by finetune and distill), `teacher_predictions` (a teacher's outputs on every cached view,
cached and fingerprinted) and `rounds` (collaborative rounds of distill, each student the next teacher).

Every training stage is a `train.engine.Task` plugged into `train.engine.fit`.
May import: every layer below (errors, files, dist, data, losses, cache, labels, models, train, evaluate). Never:
inspect, and never the CLI.
"""
