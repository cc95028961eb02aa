"""Thin Hydra entry points (console scripts)."""
