import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def kvm_module() -> str:
    """'kvm_pvm', 'kvm_intel', 'kvm_amd' or '' (no /dev/kvm)."""
    if not os.path.exists("/dev/kvm"):
        return ""
    for mod in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.isdir(f"/sys/module/{mod}"):
            return mod
    return "kvm"


def pytest_collection_modifyitems(config, items):
    # Tests that need /dev/kvm must run where it exists; where it does not, say so loudly.
    if os.path.exists("/dev/kvm"):
        return
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="no /dev/kvm on this machine"))
