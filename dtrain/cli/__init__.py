"""Thin Hydra entry points (console scripts).

Each script imports its implementation (torch, models, gRPC servers) inside
its task function, not at module level: a mistyped key, a bad value or an
unwritable output directory is reported in one line before any of that is
loaded. Everything else is imported at module level.
"""
