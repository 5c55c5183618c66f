"""Shared pytest configuration for the storaged test suite.

Add fixtures shared by several test modules here; module-specific fixtures
belong in their test module.
"""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import settings
except ImportError:  # hypothesis is in the [test] extra; tolerate its absence here
    pass
else:
    # No per-example deadline: CI machines have 2 cores and noisy neighbours.
    settings.register_profile("default", deadline=None)
    settings.register_profile("ci", deadline=None, print_blob=True)
    settings.load_profile(
        os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``root`` fail, naming what is missing, when not run as root.

    The NFS backend opens files by handle (open_by_handle_at(2) needs
    CAP_DAC_READ_SEARCH): such a test cannot run as another user, and a
    silent skip would hide that it never ran.
    """
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail(f"{item.nodeid} needs root (open_by_handle_at(2) needs "
                    "CAP_DAC_READ_SEARCH): run the tests as root, as scripts/test.sh on CI does",
                    pytrace=False)
