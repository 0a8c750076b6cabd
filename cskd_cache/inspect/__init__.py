"""Diagnosis and reporting: what a person looks at to understand a cache, a run or a model.

- `neighbors`: nearest neighbours, the training-free kNN probe and near-duplicates, as an HTML page;
- `attention`: per-layer attention distance and entropy (feature collapse);
- `report`: a run's static HTML report, led by `run_summary`'s card; `compare`: runs side by side;
  `contact_sheet`: the image grids and page helpers they share;
- `proxy_quality`: the degradation proxy set (`cskd proxy-set`); `samples`: procedural sample photos.

The top layer. May import: every layer below. Nothing in the library imports it.
"""
