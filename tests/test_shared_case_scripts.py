"""The failing-case scripts of ../shared/cases/, run as their authors run them: each must print PASS."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
SCRIPTS = sorted(path.name for path in CASES.glob("[0-9]*.py")) if CASES.is_dir() else []


@pytest.mark.slow  # each script is a fresh process that imports torch and transformers
@pytest.mark.parametrize("script", SCRIPTS or [None])
def test_shared_case_prints_pass(script):
    if script is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have ../shared/cases beside the project ({CASES})")
        pytest.skip("no ../shared/cases beside the project")
    done = subprocess.run([sys.executable, script], cwd=CASES, capture_output=True, text=True, timeout=300)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-2000:]
    assert done.returncode == 0 and last.startswith("PASS"), last
