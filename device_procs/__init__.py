"""Device processes: the untrusted side of Bulkhead (virtio devices, their jail, their host loop)."""
