"""Shaping: changing what goes out (coercion), written as new files, originals untouched."""
