"""Shared pytest fixtures (offline, CPU, random-init models only).

``tiny_clip_name``
    Registers a tiny open_clip ViT config (64 px input, 16 px patches -> 4x4 grid, 2 blocks of width 64,
    32-d joint embedding) with ``open_clip.add_model_config`` and returns its name. Build it with
    ``open_clip.create_model_and_transforms(tiny_clip_name)`` or the spec ``f"open_clip:{tiny_clip_name}"``.
``one_thread``
    Module-scoped: torch intra-op threads set to 1 (``pytestmark = pytest.mark.usefixtures("one_thread")``).
    Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning OpenMP threads
    made the training tests over ten times slower than one.
``tiny_clip_checkpoint``
    ``(name, path, model)``: a freshly random-initialised tiny CLIP (eval mode) whose full ``state_dict`` is
    saved at ``path`` (.pt), so ``f"open_clip:{name}@{path}"`` must reproduce ``model`` exactly.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

# CI installs the package (`pip install -e .`); this keeps a plain checkout's `pytest` working too.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Offline by construction, not by convention: hub clients are told so (subprocesses inherit it), and any
# connection from the test process to a non-loopback address fails the test that made it. A spec that merely
# names a hub tag (tests/test_teachers.py parses "@openai") is thereby shown to download nothing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def no_network():
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach {address!r}; tests must run offline")
        return real_connect(self, address)

    socket.socket.connect = connect
    yield
    socket.socket.connect = real_connect

TINY_CLIP_NAME = "cskd-test-vit"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory) -> str:
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        cfg_dir = tmp_path_factory.mktemp("open_clip_configs")
        (cfg_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(cfg_dir)
    return TINY_CLIP_NAME


@pytest.fixture
def tiny_clip_checkpoint(tiny_clip_name, tmp_path_factory):
    import open_clip

    model = open_clip.create_model(tiny_clip_name, pretrained=None).eval()
    path = tmp_path_factory.mktemp("tiny_clip_ckpt") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return tiny_clip_name, str(path), model
