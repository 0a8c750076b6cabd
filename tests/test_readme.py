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


def bash_block(section: str, nth: int = 0) -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", body, re.S)[nth]
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_ci_runs_the_readme_setup_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    for cmd in bash_block("Set up"):
        assert cmd in ci, f".ci/run does not run the README command: {cmd}"


@pytest.mark.slow
def test_quickstart_runs_offline(tmp_path):
    """`cskd demo` runs, its steps are the README's step-by-step list, and the rest of that list runs on its outputs
    (so every quickstart command runs once)."""
    from cskd_cli.demo import demo_steps

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    assert bash_block("Quickstart") == ["cskd demo --out demo"]
    steps = ["cskd " + shlex.join(s) for s in demo_steps("demo")]
    by_hand = bash_block("Quickstart", 1)
    assert by_hand[:len(steps)] == steps  # the README lists exactly what the demo runs, in order
    for line in ["cskd demo --out demo", *by_hand[len(steps):]]:
        args = shlex.split(line)
        assert args[0] == "cskd"
        r = subprocess.run([sys.executable, "-m", "cskd_cli.main", *args[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
    assert (tmp_path / "demo" / "cache" / "manifest.json").is_file()
    for page in ("student/report.html", "compare.html", "scores.png"):
        assert (tmp_path / "demo" / page).is_file(), page
    assert "paired" in (tmp_path / "demo" / "compare.html").read_text().lower()
