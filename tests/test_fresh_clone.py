"""The newcomer: the repository's tracked files alone, in a folder with nothing beside it, pass `dstar-edu verify`.

This is what a fresh ``git clone`` on another machine gets: no folder beside it, no untracked files, no data
folder. It reuses the installed environment (the packages), but imports ``dstar_edu`` and ``toy_data`` from
the copy, so a check that reads anything outside the repository (or a file not tracked in git) fails here.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git checkout ({err}): the fresh-clone test needs the list of tracked files")
    return [f for f in out.stdout.decode().split("\0") if f]


def test_fresh_clone_passes_verify(tmp_path):
    clone = tmp_path / "alone" / "dstar_edu"          # nothing beside it: no sibling data folder
    for rel in _tracked_files():
        src = ROOT / rel
        if src.is_file():                             # a tracked file deleted in the working tree is skipped
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / rel)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSTAR_EDU_")}
    env["PYTHONPATH"] = str(clone)
    probe = subprocess.run([sys.executable, "-c", "import dstar_edu, toy_data; print(dstar_edu.__file__); "
                            "print(toy_data.__file__)"], cwd=clone, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert all(line.startswith(str(clone)) for line in probe.stdout.split()), probe.stdout
    report = tmp_path / "verify.json"
    run = subprocess.run([sys.executable, "-m", "dstar_edu.cli", "verify", "--json", str(report)], cwd=clone,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads(report.read_text())
    assert len(results) >= 190 and all(r["passed"] for r in results)
    sources = {r["details"].get("data") for r in results if r["dim"] == 3072}
    assert not any("synthetic" in str(s) for s in sources)
