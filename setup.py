# setuptools needs setup.py for cffi_modules (the cffi build hook has no pyproject table).
import os

from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))
CFFI_MODULES = [
    "vmm_core/kvm/_build.py:ffibuilder",            # <linux/kvm.h>
    "jail/_seccomp_build.py:ffibuilder",  # <seccomp.h>, -lseccomp
    "ipc_protocol/_atomics_build.py:ffibuilder",  # shared-memory atomics (register page)
    "vmm_core/vhost_frontend/_watch_build.py:ffibuilder",  # the ring watch's native sampler
    "device_procs/virtio/_fastpath_build.py:ffibuilder",  # chain walk, net loops (in the jail)
]

setup(cffi_modules=[m for m in CFFI_MODULES if os.path.exists(os.path.join(_HERE, m.split(":")[0]))])
