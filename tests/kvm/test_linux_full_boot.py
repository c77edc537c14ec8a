"""A full boot of Debian's cloud kernel to the initramfs marker and `poweroff` (exit 0).

This needs hardware KVM (VMX/SVM).  On a kvm_pvm host every kernel instruction at CPL0 is
emulated (~1.5 M instructions/s) and the emulator lacks `int3` (used by the kernel's alternatives
self-test), so the kernel stops after "x86/fpu: x87 FPU will use FXSAVE", about 50 s of guest
time in (see test_linux_boot.py for what it proves there).  The test detects the module and says
so in its skip reason rather than hiding.
"""

import os

import pytest

from vmm_core.testing import run_bulkhead

pytestmark = [pytest.mark.kvm, pytest.mark.hwkvm, pytest.mark.slow]


def test_boot_to_initramfs_and_poweroff():
    if os.path.isdir("/sys/module/kvm_pvm"):
        pytest.skip("needs hardware KVM: this host's /dev/kvm is kvm_pvm (software nested "
                    "virtualisation); the kernel cannot get past early boot here")
    from vmm_core.guest_assets import fetch_guest_assets
    assets = fetch_guest_assets()
    run = run_bulkhead("run", "--kernel", str(assets.kernel), "--initrd", str(assets.initrd),
                       "--mem", "320", "--vcpus", "2", "--rng", "--timeout", "120", "--cmdline",
                       "console=ttyS0 i8042.noaux reboot=k panic=-1", timeout=180)
    assert "BULKHEAD-INITRAMFS-OK" in run.stdout, run.explain()
    assert run.returncode == 0, run.explain()
