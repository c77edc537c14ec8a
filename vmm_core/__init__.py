"""Bulkhead core process: KVM, guest memory, the Bus, legacy devices and the CLI."""
