# setuptools needs setup.py for cffi_modules (the cffi build hook has no pyproject table).
from setuptools import setup

setup(
    cffi_modules=[
        "vmm_core/kvm/_build.py:ffibuilder",
        "device_procs/jail/_seccomp_build.py:ffibuilder",
    ],
)
