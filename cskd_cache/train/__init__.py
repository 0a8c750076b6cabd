"""The one training engine and what it needs: configs, the loop, checkpoints, run directories, the EMA.

- `config`: `CommandConfig` (from_dict / from_yaml / validate / changed, renamed keys read with a notice) and
  `TrainConfig`, the fields every training command shares, declared once;
- `engine`: `Task` and `fit`, the loop align, finetune and distill plug into (schedule, AMP, clipping, NaN guard,
  EMA, metrics, checkpoints, resume, DDP), and `train_step`;
- `checkpoint`, `state_io`: epoch checkpoints as safetensors + JSON, no pickle;
- `run_dir`: claiming ``--out`` and refusing to mix runs; `run_log`: config.yaml, metrics.jsonl, the loss curve;
- `ema`: the weight EMA.

May import: `errors`, `files`, `dist`, `data`, `models` (weight loading). Never: cache, labels, evaluate, stages,
inspect.
"""
