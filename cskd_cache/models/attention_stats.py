"""Attention statistics of ViT-family encoders, the recomputation itself: where a model's attention modules are,
their probabilities recomputed from each module's input, and per-image mean attention distance and entropy.

Below the stages, because `cskd extract --attention-stats` records them in the same forward as the teacher's
features and `cskd distill --attn-reference teacher` reads them back; `inspect.attention` (the `cskd attention`
command) measures, plots and documents them (definitions in its module docstring and docs/cache-format.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EvaluateError

__all__ = ["NotAttentionModel", "UnsupportedAttention", "AttentionModel", "AttentionRecorder", "from_module",
           "attention_probs", "distance_matrix", "attention_stats", "uniform_values", "stats_storage",
           "depth_matched"]


class NotAttentionModel(EvaluateError):
    """The model has no self-attention over patch tokens (a CNN, say)."""


class UnsupportedAttention(EvaluateError):
    """A ViT whose attention modules cskd cannot recompute faithfully."""


# --- probabilities, recomputed from a block's attention module and its input -------------------------------


def _timm_attention_type():
    try:
        from timm.layers import Attention
    except ImportError:
        return None
    return Attention


def _open_clip_attention_type():
    try:
        from open_clip.transformer import Attention
    except ImportError:
        return None
    return Attention


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def attention_probs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) attention probabilities of ``module`` for its input ``x`` (B, N, C), in float32.

    ``x`` is batch-first; `AttentionRecorder` transposes sequence-first nn.MultiheadAttention inputs before calling."""
    x = x.float()
    timm_attn, oc_attn = _timm_attention_type(), _open_clip_attention_type()
    if timm_attn is not None and type(module) is timm_attn:
        b, n, _ = x.shape
        qkv = F.linear(x, module.qkv.weight.float(), None if module.qkv.bias is None else module.qkv.bias.float())
        q, k, _v = qkv.reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)
        return ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
    if isinstance(module, nn.MultiheadAttention):
        if not module._qkv_same_embed_dim:
            raise UnsupportedAttention("nn.MultiheadAttention with separate q/k/v projections (kdim/vdim) is "
                                       "cross-attention, not a ViT block")
        bias = module.in_proj_bias
        q, k, _v = F.linear(x, module.in_proj_weight.float(), None if bias is None else bias.float()).chunk(3, -1)
        q, k = _heads(q, module.num_heads), _heads(k, module.num_heads)
        return ((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])).softmax(-1)
    if oc_attn is not None and type(module) is oc_attn:
        bias = module.in_proj_bias
        q, k, _v = F.linear(x, module.in_proj_weight.float(), None if bias is None else bias.float()).chunk(3, -1)
        q, k = _heads(q, module.num_heads), _heads(k, module.num_heads)
        if module.logit_scale is not None:
            # open_clip 3.x's scaled-cosine branch calls torch.bmm on 4-D tensors and cannot run; nothing to measure
            raise UnsupportedAttention("open_clip Attention with scaled cosine attention is not supported")
        q, k = module.ln_q(q), module.ln_k(k)
        return ((q * module.scale) @ k.transpose(-2, -1)).softmax(-1)
    raise UnsupportedAttention(f"cannot recompute the attention of {type(module).__module__}.{type(module).__name__}")


def _is_site(module: nn.Module) -> bool:
    timm_attn, oc_attn = _timm_attention_type(), _open_clip_attention_type()
    return ((timm_attn is not None and type(module) is timm_attn) or isinstance(module, nn.MultiheadAttention)
            or (oc_attn is not None and type(module) is oc_attn))


# --- statistics ---------------------------------------------------------------------------------------------


def distance_matrix(grid: Sequence[int], patch_size: Sequence[int]) -> torch.Tensor:
    """(T, T) Euclidean distances in input pixels between the patches of an h x w grid, row-major."""
    h, w = (int(v) for v in grid)
    ph, pw = (float(v) for v in patch_size)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    pos = torch.stack([rows.reshape(-1) * ph, cols.reshape(-1) * pw], -1)
    return torch.cdist(pos, pos).float()


def attention_stats(probs: torch.Tensor, num_prefix: int, dist: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image and head (B, heads): ``distance``, ``entropy`` and ``prefix_mass`` (see the module docstring).

    ``probs`` is (B, heads, P + T, P + T) with the P prefix tokens first; ``dist`` is (T, T)."""
    p = int(num_prefix)
    patch_q = probs[:, :, p:, :].float()
    prefix_mass = patch_q[..., :p].sum(-1)
    a = patch_q[..., p:]
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    if a.shape[-1] != dist.shape[0]:
        raise EvaluateError(f"attention over {a.shape[-1]} patch keys but a distance matrix for {dist.shape[0]} patches")
    distance = (a * dist.to(a.device)).sum(-1).mean(-1)
    entropy = -torch.special.xlogy(a, a).sum(-1).mean(-1)
    return {"distance": distance, "entropy": entropy, "prefix_mass": prefix_mass.mean(-1)}


# --- models -------------------------------------------------------------------------------------------------


@dataclass
class AttentionModel:
    """A ViT ready to measure: ``forward`` runs every block, ``transform`` maps a PIL image to its input."""

    label: str
    spec: str
    family: str
    module: nn.Module  # where the attention sites live
    forward: Callable[[torch.Tensor], object]
    transform: Callable
    input_size: tuple[int, int]
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    sites: list[nn.Module] = field(default_factory=list)

    @property
    def grid(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size[0], self.input_size[1] // self.patch_size[1]

    @property
    def num_heads(self) -> int:
        return int(self.sites[0].num_heads)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, float)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _geometry(spec: str, module: nn.Module) -> tuple[str, tuple[int, int], int, nn.Module]:
    """(family, patch size, prefix tokens, the module holding the blocks) of a timm or open_clip ViT."""
    try:
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import VisionTransformer as OpenClipViT
    except ImportError:
        OpenClipViT = TimmModel = ()  # noqa: N806 - isinstance(x, ()) is False
    if isinstance(module, OpenClipViT):
        # open_clip's VisionTransformer always prepends one class token
        return "open_clip", _pair(module.patch_size), 1, module
    if isinstance(module, TimmModel):
        module = module.trunk
    pe = getattr(module, "patch_embed", None)
    if pe is not None and hasattr(pe, "patch_size") and hasattr(module, "num_prefix_tokens"):
        return "timm", _pair(pe.patch_size), int(module.num_prefix_tokens), module
    _unsupported(spec, module)
    raise NotAttentionModel(f"{spec} ({type(module).__name__}) is not a ViT-family model: only ViT-family models "
                            "have attention (open_clip VisionTransformer, timm VisionTransformer, or a run: of one)")


def _unsupported(spec: str, module: nn.Module) -> None:
    """Raise UnsupportedAttention when the model attends in a way cskd does not recompute (Swin, MaxViT, ...)."""
    others = sorted({type(m).__name__ for m in module.modules()
                     if "attention" in type(m).__name__.lower() and not _is_site(m)})
    if others:
        raise UnsupportedAttention(f"{spec}: its attention modules ({', '.join(others)}) are not supported; cskd "
                                   "recomputes global self-attention of timm Attention, nn.MultiheadAttention and "
                                   "open_clip Attention only")


def _sites(spec: str, module: nn.Module) -> list[nn.Module]:
    # Only the trunk's blocks: attention pooling heads (timm "map", open_clip's AttentionalPooler) attend from
    # learned queries, not between patches.
    trunk = getattr(module, "transformer", None) or getattr(module, "blocks", None) or module
    sites = [m for m in trunk.modules() if _is_site(m)]
    if sites:
        return sites
    _unsupported(spec, module)
    raise NotAttentionModel(f"{spec} ({type(module).__name__}) has no attention layers: only ViT-family models "
                            "have attention")


def from_module(module: nn.Module, transform: Callable, input_size: Sequence[int], spec: str = "module",
                forward: Callable | None = None, label: str | None = None, family_prefix: str = "") -> AttentionModel:
    """An AttentionModel for an already built timm or open_clip ViT (eval mode is set here). ``forward`` defaults
    to running the blocks (timm ``forward_features``, the open_clip tower itself)."""
    module.eval()
    family, patch, prefix, holder = _geometry(spec, module)
    if forward is None:
        forward = holder.forward_features if family == "timm" else module.__call__
    sites = _sites(spec, holder)
    h, w = _pair(input_size)
    return AttentionModel(label or spec, spec, family_prefix + family, holder, forward, transform, (h, w), patch,
                          prefix, sites)


class AttentionRecorder:
    """Forward pre-hooks that turn each site's input into per-head sums of the statistics."""

    def __init__(self, model: AttentionModel, per_image: bool = False):
        self.model = model
        self.dist = distance_matrix(model.grid, model.patch_size)
        self.sums = [None] * len(model.sites)
        self.per_image = per_image
        self.last: list[dict | None] = [None] * len(model.sites)
        self.images = 0
        self.handles = []

    def take(self) -> dict[str, np.ndarray]:
        """With ``per_image``: (B, layers, heads) float32 ``distance`` and ``entropy`` of the last forward."""
        if any(v is None for v in self.last):
            raise UnsupportedAttention(f"{self.model.spec}: some attention modules never ran in the last forward")
        out = {k: torch.stack([v[k] for v in self.last], 1).numpy().astype(np.float32) for k in ("distance", "entropy")}
        self.last = [None] * len(self.model.sites)
        return out

    def __enter__(self):
        for i, site in enumerate(self.model.sites):
            self.handles.append(site.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("query", kwargs.get("x"))
            masks = [kwargs.get("attn_mask"), kwargs.get("key_padding_mask"), kwargs.get("is_causal")]
            if any(m is not None and m is not False for m in masks):
                raise UnsupportedAttention(f"{self.model.spec}: block {i} attends with a mask; cskd measures "
                                           "unmasked image self-attention only")
            if isinstance(module, nn.MultiheadAttention):
                key = args[1] if len(args) > 1 else kwargs.get("key", x)
                if key is not x and not torch.equal(key, x):
                    raise UnsupportedAttention(f"{self.model.spec}: block {i} is cross-attention")
                if not module.batch_first:
                    x = x.transpose(0, 1)
            expected = self.model.num_prefix_tokens + self.model.grid[0] * self.model.grid[1]
            if x.shape[1] != expected:
                raise UnsupportedAttention(
                    f"{self.model.spec}: block {i} attends over {x.shape[1]} tokens, expected {expected} "
                    f"({self.model.num_prefix_tokens} prefix + {self.model.grid[0]}x{self.model.grid[1]} patches); "
                    "windowed or pooled attention is not supported")
            with torch.no_grad():
                stats = attention_stats(attention_probs(module, x), self.model.num_prefix_tokens, self.dist)
            if self.per_image:
                self.last[i] = {k: v.float().cpu() for k, v in stats.items()}
                return
            sums = {k: v.double().sum(0).cpu() for k, v in stats.items()}
            self.sums[i] = sums if self.sums[i] is None else {k: self.sums[i][k] + v for k, v in sums.items()}
        return hook


def uniform_values(dist: torch.Tensor) -> tuple[float, float]:
    return float(dist.double().mean()), math.log(dist.shape[0])


def stats_storage(model: AttentionModel) -> dict:
    """The manifest's ``storage.attention_stats`` for a teacher measured at extract time."""
    ud, ue = uniform_values(distance_matrix(model.grid, model.patch_size))
    return {"num_layers": len(model.sites), "num_heads": model.num_heads, "input_size": list(model.input_size),
            "patch_size": list(model.patch_size), "grid": list(model.grid),
            "num_prefix_tokens": model.num_prefix_tokens, "family": model.family, "uniform_distance": ud,
            "uniform_entropy": ue, "definitions": "cskd_cache.inspect.attention (docs/cache-format.md)"}


def depth_matched(values: Sequence[float], n: int) -> list[float]:
    """A per-layer profile of len(values) layers resampled to ``n`` layers by relative depth (layer i of n at
    i / (n - 1) of the way through), linearly interpolated: how a 12-layer teacher's profile meets a 6-layer
    student."""
    v = np.asarray(values, dtype=np.float64)
    if n == 1 or len(v) == 1:
        return [float(v.mean())] * n
    return [float(x) for x in np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(v)), v)]
