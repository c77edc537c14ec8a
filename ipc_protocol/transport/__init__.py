"""Thin I/O layers under the sans-I/O protocol: shared-memory rings, ZeroMQ control, fd passing."""
