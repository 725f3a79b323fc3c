"""Shaping: what DicomFlow changes in a file on its way out (coercion operations, rewriting)."""
