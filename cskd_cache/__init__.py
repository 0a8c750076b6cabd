"""cskd_cache: the library half of cskd.

Importable without typer or rich; the `cskd` command (package `cskd_cli`) is a thin layer over it.
"""

__version__ = "0.1.0"
