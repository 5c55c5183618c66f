"""Shared pytest configuration for the storaged test suite.

Add fixtures shared by several test modules here; module-specific fixtures
belong in their test module.
"""

from __future__ import annotations

import os

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
