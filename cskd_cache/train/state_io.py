"""Trainer state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint's trainer state (optimizer moments, loss scaler, RNG streams, EMA weights, epoch counters) used to
be a `torch.save` pickle, and unpickling a file runs whatever code it names: a run directory downloaded from
someone else could run a shell command on `--resume`. Here the state is split into
``state.safetensors`` (every tensor and numpy array, by a generated name) and ``state.json`` (the structure,
with a reference where each array was). Loading either file never executes anything from it.

JSON cannot say "tuple", "dict with int keys" or "numpy array", so those are tagged:
``{"__tuple__": [...]}``, ``{"__items__": [[key, value], ...]}``, ``{"__tensor__": NAME}`` and
``{"__ndarray__": NAME, "dtype": ..., "shape": [...]}`` (arrays are stored as raw bytes, so any dtype, uint32
included, round-trips bit for bit: a resumed run stays byte-identical to an uninterrupted one).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TrainError

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
_TAGS = ("__tuple__", "__items__", "__tensor__", "__ndarray__", "__float__")


class StateFormatError(TrainError):
    """A state.json / state.safetensors pair that cskd did not write or that was altered."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.frombuffer(bytearray(np.ascontiguousarray(obj).tobytes()), dtype=torch.uint8) \
            if obj.nbytes else torch.zeros(0, dtype=torch.uint8)
        return {"__ndarray__": name, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in trainer state (tensors, arrays, numbers, strings, "
                    "lists, tuples and dicts only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return _tensor(tensors, obj["__tensor__"], where)
    if "__ndarray__" in obj:
        raw = _tensor(tensors, obj["__ndarray__"], where).numpy().tobytes()
        try:
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        except (TypeError, ValueError) as e:
            raise StateFormatError(f"{where}: array {obj['__ndarray__']} does not fit its dtype/shape ({e})") from e
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _tensor(tensors: dict[str, torch.Tensor], name: str, where: str) -> torch.Tensor:
    if name not in tensors:
        raise StateFormatError(f"{where}: refers to tensor {name!r}, which {STATE_TENSORS} does not hold")
    return tensors[name]


def save_state(directory: str | os.PathLike, state: dict) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(structure, allow_nan=False) + "\n", encoding="utf-8")


def load_state(directory: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    directory = Path(directory)
    where = str(directory / STATE_JSON)
    try:
        structure = json.loads((directory / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise StateFormatError(f"{where}: unreadable trainer state ({e}); resume from an earlier checkpoint or "
                               "start a new --out") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
        raise StateFormatError(f"{directory / STATE_TENSORS}: unreadable ({e}); resume from an earlier checkpoint "
                               "or start a new --out") from e
    state = _decode(structure, tensors, where)
    if not isinstance(state, dict):
        raise StateFormatError(f"{where}: not a trainer state (a JSON object was expected)")
    return state
