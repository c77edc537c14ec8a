"""ACPI tables describing the guest platform: `aml` (the AML encoder), `tables` (the tables)."""

from .tables import VirtioMmioSlot, build_acpi, layout_acpi

__all__ = ["VirtioMmioSlot", "build_acpi", "layout_acpi"]
