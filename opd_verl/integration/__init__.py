"""Thin adapters between the pure objectives and veRL 0.9.1 (registration, batch-field mapping)."""
