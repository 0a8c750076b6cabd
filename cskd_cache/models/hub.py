"""Is a pretrained tag's weights file here, or can it be fetched? Answered before open_clip or timm try.

Asked offline, open_clip and timm retry the hub for about a minute and print pages of tracebacks before the
one line that matters. This module looks in the local caches those libraries read (the Hugging Face hub cache,
open_clip's and torch hub's URL caches) and, when the file is not there, decides in at most ~1.5 s whether the
hub can be reached (``HF_HUB_OFFLINE`` set: no; else one TCP connect to the hub), so that an offline machine
gets one line naming the spec and the fix.
"""

from __future__ import annotations

import os
import socket

from ..errors import ModelError

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable(host: str = "huggingface.co", timeout: float = 1.5) -> bool:
    if hub_offline():
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(repo_id: str, filenames: list[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _open_clip_cached(name: str, tag: str) -> bool:
    import open_clip
    from open_clip import pretrained as ocp

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    hf = cfg.get("hf_hub", "")
    if hf:
        repo, filename = os.path.split(hf)
        filename = filename or getattr(ocp, "HF_WEIGHTS_NAME", "open_clip_pytorch_model.bin")
        alternatives = list(getattr(ocp, "_get_safe_alternatives", lambda f: [])(filename))
        if _in_hf_cache(repo, [*alternatives, filename]):
            return True
    url = cfg.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def _timm_cached(name: str, tag: str) -> bool:
    import timm
    from timm.models import get_pretrained_cfg

    full = name if tag.lower() == "true" else f"{name}.{tag}"
    cfg = get_pretrained_cfg(full)
    if cfg is None and tag.lower() == "true":
        tagged = timm.list_pretrained(f"{name}.*")
        cfg = get_pretrained_cfg(tagged[0]) if tagged else None
    if cfg is None:
        return False
    if getattr(cfg, "file", None):
        return os.path.isfile(cfg.file)
    if getattr(cfg, "hf_hub_id", None):
        if _in_hf_cache(cfg.hf_hub_id, ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]):
            return True
    url = getattr(cfg, "url", None)
    if url:
        import torch

        return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))
    return False


def require_weights_reachable(spec) -> None:
    """ValueError in one line when ``spec``'s pretrained tag is neither cached here nor fetchable now."""
    cached = (_open_clip_cached if spec.kind == "open_clip" else _timm_cached)(spec.name, spec.pretrained)
    if cached or hub_reachable():
        return
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub (huggingface.co) cannot be reached"
    example = f"{spec.kind}:{spec.name}@/path/to/{'ckpt.pt' if spec.kind == 'open_clip' else 'model.safetensors'}"
    raise ModelError(f"{spec.raw}: the weights of tag {spec.pretrained!r} are not in the local cache and {why}; "
                     f"fetch them once on a machine with network (the same cache dir), or pass a local file: "
                     f"{example}")
