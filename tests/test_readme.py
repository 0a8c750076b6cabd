"""The README is the front door: its set-up commands are what CI runs and its quickstart really runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bash_block(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_ci_runs_the_readme_setup_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in bash_block("Set up"):
        assert cmd in ci, f".ci/run does not run the README command: {cmd}"


@pytest.mark.slow
def test_quickstart_runs_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for line in bash_block("Quickstart"):
        args = shlex.split(line)
        assert args[0] == "cskd"
        r = subprocess.run([sys.executable, "-m", "cskd_cli.main", *args[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "demo" / "cache" / "manifest.json").is_file()
