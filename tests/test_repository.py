"""The repository as a newcomer gets it: CI runs the test command the README gives, and no file
outside the tests names a folder of the machine it was written on."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"/work/|/tmp/[a-z]", re.IGNORECASE)


def test_ci_runs_the_readme_test_command_exactly() -> None:
    readme = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()]
    command = next(line for line in readme if line.startswith("python -m pytest"))
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci[-1] == command and "-m" not in command.split()[3:]  # the whole suite, not a tier


def test_no_file_outside_the_tests_names_this_machines_folders() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    found = []
    for name in tracked.decode().split("\0"):
        path = ROOT / name
        if not name or name.startswith("tests/") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # images, tars
        found += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if MACHINE_PATH.search(line)]
    assert not found, "use placeholders (DATA, OUT) or $MAE_DATASETS instead:\n" + "\n".join(found)
