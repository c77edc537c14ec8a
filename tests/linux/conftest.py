"""Fixtures of the user-mode Linux tests: the host check and the vhost-user-blk backends.

`blk_backend` runs a test once per entry of `vmm_core.testing.uml.BLK_BACKENDS`, so a new
backend (Bulkhead's own) gets the whole suite by adding one entry there.
"""

from __future__ import annotations

import pytest

from typing import Callable

from vmm_core.testing.uml import BLK_BACKENDS, BlkBackend, uml_unavailable


@pytest.fixture(scope="session")
def uml_host() -> None:
    """Fails (does not skip) where UML cannot boot: dev.sh installs everything it needs."""
    reason = uml_unavailable()
    if reason is not None:
        pytest.fail(f"user-mode Linux unavailable: {reason} (run ./dev.sh setup)")


@pytest.fixture(params=sorted(BLK_BACKENDS))
def make_blk_backend(request, uml_host) -> Callable[[], BlkBackend]:
    """Makes backends of one `BLK_BACKENDS` entry, not started yet: a test's UmlBed starts each
    on an image (`add_blk`) and stops it when the bed closes."""
    return BLK_BACKENDS[request.param]

