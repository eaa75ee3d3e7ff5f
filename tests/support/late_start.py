"""A pytest plugin that makes every test module look as if the suite reached it late.

    python3 -m pytest -p tests.support.late_start tests/test_token.py

While tests are collected (test modules imported), ``time.time`` runs
``MIRROR_TEST_LATE_START`` seconds (default 900) behind the real clock; it is
the real clock again before the first fixture runs.  A module that fixes its
clock at import then sees a time that long before its fixtures and tests run,
as it would on a slow machine that needs 15 minutes to reach it, without waiting.
"""

from __future__ import annotations

import os
import time

_real_time = time.time
_behind = 0.0


def _clock() -> float:
    # one function for the whole session: code that captured ``time.time`` at
    # import (a default argument) gets the real clock once collection is over
    return _real_time() - _behind


def pytest_configure(config) -> None:
    global _behind
    _behind = float(os.environ.get("MIRROR_TEST_LATE_START", "900"))
    time.time = _clock


def pytest_collection_finish(session) -> None:
    global _behind
    _behind = 0.0


def pytest_unconfigure(config) -> None:
    time.time = _real_time
