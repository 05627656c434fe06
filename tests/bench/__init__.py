"""Benchmarks on the real local stack (printed tables, never timed assertions)."""
