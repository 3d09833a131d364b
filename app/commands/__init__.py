"""Operator sub-commands of `qm`, one module per area."""
