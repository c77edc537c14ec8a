"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import shutil
import tempfile
from typing import Callable, Iterator

import pytest

from vmm_core.testing.held import FaultyVm
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


@pytest.fixture
def private_registry(monkeypatch):
    """A registry (and runtime dirs) of our own: a short path, since socket paths are limited."""
    path = tempfile.mkdtemp(prefix="bh")
    monkeypatch.setenv("XDG_RUNTIME_DIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def faulty_vm(tmp_path, private_registry):
    vms = []

    def start(name: str, *extra: str, rounds: int = 300) -> FaultyVm:
        vms.append(FaultyVm(tmp_path, name, *extra, rounds=rounds))
        return vms[-1]

    yield start
    for vm in vms:
        vm.close()
