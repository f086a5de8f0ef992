"""Handing AppPot jobs to existing batch systems: one job model, one renderer per target."""
