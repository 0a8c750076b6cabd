"""Measuring and shipping a trained scorer: metrics, `cskd evaluate`, `cskd predict`, `cskd export`, the kNN index.

- `metrics`: SRCC, PLCC, accuracy, MAE, EMD and bootstrap intervals; `knn_index`: exact or IVF search (faiss when
  installed, torch otherwise);
- `scoring`: image files through a scorer's eval view (shared by evaluate and predict);
- `evaluate`, `predict`, `export`: the commands.

May import: errors, files, data, cache, labels, models, train (configs, devices). Never: stages, inspect.
"""
