"""The suite on a slow machine: no test's clock is fixed when its module is imported.

A whole-suite run on a loaded 2-core machine reaches a module many minutes
after collection imported it.  ``tests/support/late_start.py`` makes that
happen without waiting (``time.time`` runs 15 minutes behind while modules are
imported); the token tests, whose certificates and tokens are minted against
a clock, must pass that way.  The CPU-hog half of T-SLOW-01 is a procedure,
``scripts/test-under-load`` (README, Development).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "T-SLOW-01": "the suite reaches a module 15 minutes after importing it: token tests still pass "
                 "(their clock is read per test; test certificates valid from a day before)",
}

# the tests that failed with a clock fixed at import: x5c chains, leeways, key swaps
LATE_SENSITIVE = "valid_x5c or nbf_leeway or exp_leeway or keys_swap or not_yet_valid_leaf"


@pytest.mark.parametrize("case_id", ["T-SLOW-01"])
def test_token_tests_pass_when_reached_late(case_id) -> None:
    env = {**os.environ, "MIRROR_TEST_LATE_START": "900",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.support.late_start",
         "tests/test_token.py", "-k", LATE_SENSITIVE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-1000:]


def test_case_table_is_complete() -> None:
    """Every case ID of the table is the id of a test in this module."""
    after_table = Path(__file__).read_text().split("CASES = {", 1)[1].split("\n}\n", 1)[1]
    for case_id in CASES:
        assert f'"{case_id}"' in after_table, case_id
