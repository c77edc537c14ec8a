"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from vmm_core.testing.netns import Namespaces, remove_stale


@pytest.fixture
def netns() -> Iterator[Callable[[], str]]:
    """Makes `ip netns` namespaces for one test; all are deleted afterwards, pass or fail."""
    remove_stale()
    spaces = Namespaces()
    try:
        yield spaces.make
    finally:
        spaces.cleanup()
