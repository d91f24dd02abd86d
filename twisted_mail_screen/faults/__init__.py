"""Deterministic fault injection for test-host mode (docs/faults.md)."""
