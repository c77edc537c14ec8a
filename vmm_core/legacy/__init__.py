"""Legacy PC devices, pure Python `BusDevice`s with no KVM imports.

Everything a device needs from the VM (output streams, IRQ lines, reset/poweroff/exit actions)
arrives as constructor callables, so each device is unit-tested with plain Python.
"""
