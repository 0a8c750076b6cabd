"""Code named by files: a ``py:`` model spec inside a run directory runs only with the user's consent.

``student.json`` and ``iaa_model.json`` record the spec that rebuilds their architecture. ``timm:`` and
``open_clip:`` specs name a model in a library the user installed; a ``py:package.module:factory`` spec names code
to import and call, and a run directory downloaded from someone else (or a module planted beside it) would run
it on `cskd predict`. As Hugging Face does with ``trust_remote_code``, loading such a run needs ``trust_code``
(``--trust-code`` on the command line). A ``py:`` spec the user types on the command line is their own choice
and needs nothing; so is a ``--config`` YAML they wrote, while a run's own ``config.yaml`` (which cskd marks with
a ``resolved`` section) counts as a file from a run directory.
"""

from __future__ import annotations

import os

from ..errors import ModelError


class UntrustedCode(ModelError):
    """A run directory names Python code to run and the user did not allow it."""


def check_spec_from_file(spec: str, source: str | os.PathLike, trust_code: bool) -> None:
    """Refuse a ``py:`` spec read from ``source`` unless ``trust_code``; other specs pass."""
    if isinstance(spec, str) and spec.strip().startswith("py:") and not trust_code:
        raise UntrustedCode(f"{source}: model spec {spec.strip()!r} would import and run Python code named by this "
                            "file; pass --trust-code (trust_code=True) only if you trust whoever made it")


def written_by_cskd(config: str | os.PathLike | None) -> bool:
    """True for a config.yaml a cskd run wrote (it carries a ``resolved`` section), False for a user's own YAML."""
    if config is None:
        return False
    import yaml

    try:
        data = yaml.safe_load(open(config, encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "resolved" in data
