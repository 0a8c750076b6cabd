"""``--config FILE`` for every command: defaults <- the YAML file <- the flags given on the command line.

Training commands hand the file to their library config (`TrainConfig.from_yaml`: field names, renamed keys read
with a notice, a run's own config.yaml accepted). Every other command reads it here, before its other options
(an eager option), as click's ``default_map``: each key must name one of the command's options.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import fail


def explicit(ctx: typer.Context, name: str) -> bool:
    """Given on the command line (or environment), not a default: only those override --config.
    Compared by name because typer may hand back its own vendored click's ParameterSource enum."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def load_defaults(ctx: typer.Context, param, value: Path | None):
    """The eager ``--config`` callback of commands without a library config: the file becomes their defaults."""
    if value is None:
        return None
    from cskd_cache.errors import CskdError
    from cskd_cache.train.config import read_config_file

    try:
        data = read_config_file(value)
    except CskdError as e:
        raise typer.BadParameter(str(e), param_hint="--config") from None
    names = {}
    for p in ctx.command.params:
        if p.name == param.name or getattr(p, "hidden", False):
            continue
        names[p.name] = p.name
        for opt in getattr(p, "opts", []):
            names[opt.lstrip("-").replace("-", "_")] = p.name
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise typer.BadParameter(f"{value}: unknown keys {unknown}; valid keys: {', '.join(sorted(set(names)))}",
                                 param_hint="--config")
    ctx.default_map = {**(ctx.default_map or {}), **{names[k]: v for k, v in data.items()}}
    return value


def build_config(ctx: typer.Context, cls, config: Path | None, encoder_field: str | None = None):
    """A training command's config: defaults <- --config <- explicit flags; usage errors exit 2."""
    from cskd_cache.errors import CskdError
    from cskd_cache.models.trust import check_spec_from_file, written_by_cskd

    given = {name: value for name, value in ctx.params.items() if name != "config" and explicit(ctx, name)}
    if "epochs" in given and "max_steps" in given:
        fail("pass --epochs or --max-steps, not both", code=2)
    for name, value in list(given.items()):
        if isinstance(value, Path):
            given[name] = str(value)
    try:
        cfg = cls.from_yaml(config, **given)
        if "epochs" in given and "max_steps" not in given:
            cfg.max_steps = None  # an explicit --epochs beats a max_steps from --config
        cfg.validate()
        if getattr(cfg, "labels", None):
            from cskd_cache.labels import parse_spec

            parse_spec(cfg.labels)
        if encoder_field and encoder_field not in given and written_by_cskd(config):
            check_spec_from_file(getattr(cfg, encoder_field), config, cfg.trust_code)  # a run's config names code
    except CskdError as e:
        fail(str(e), code=2)
    return cfg
