"""The suite's own set-up (pytest.ini and tests/conftest.py), checked on a probe file run as the README runs the
suite: the default run leaves out the tests marked slow, `-m slow` (what .ci/run adds) runs just those, a marker
that is not registered is an error rather than a silently unselected test, and progress names each file under -q."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import pytest


@pytest.mark.slow
def test_long():
    pass


def test_short():
    pass
"""


def run_probe(tmp_path: Path, *args: str, source: str = PROBE) -> subprocess.CompletedProcess:
    """pytest -q on test_probe.py with the repository's pytest.ini and tests/conftest.py; -rp lists what passed."""
    (tmp_path / "test_probe.py").write_text(source)
    command = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(tmp_path),
               "-p", "tests.conftest", "-p", "no:cacheprovider", "-q", "-rp", *args, "test_probe.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def passed(result: subprocess.CompletedProcess) -> list[str]:
    return [line.split()[1] for line in result.stdout.splitlines() if line.startswith("PASSED ")]


def test_the_default_run_leaves_out_slow_tests_and_names_the_file_it_is_in(tmp_path):
    result = run_probe(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert passed(result) == ["test_probe.py::test_short"]
    assert "1 passed, 1 deselected" in result.stdout
    assert any(line.startswith("test_probe.py .") for line in result.stdout.splitlines()), result.stdout


def test_minus_m_slow_runs_only_the_slow_tests(tmp_path):
    result = run_probe(tmp_path, "-m", "slow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert passed(result) == ["test_probe.py::test_long"]


def test_a_misspelt_marker_is_an_error_not_a_test_left_out(tmp_path):
    result = run_probe(tmp_path, source=PROBE.replace("mark.slow", "mark.slwo"))
    assert result.returncode != 0
    assert "'slwo' not found in `markers` configuration option" in result.stdout + result.stderr
