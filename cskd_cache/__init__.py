"""cskd_cache: the library half of cskd.

Importable without typer or rich; the `cskd` command (package `cskd_cli`) is a thin layer over it.
"""

__version__ = "0.2.0"

__all__ = ["open_cache", "load_encoder"]


def __getattr__(name):
    # Lazy, so `import cskd_cache` stays cheap (no torch/h5py until a name is used).
    if name == "open_cache":
        from .cache.reader import open_cache
        return open_cache
    if name == "load_encoder":
        from .models.runs import load_encoder
        return load_encoder
    raise AttributeError(f"module 'cskd_cache' has no attribute {name!r}")
