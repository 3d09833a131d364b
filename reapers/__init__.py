"""The sweeps that bring back what crashes orphan; each a small class with ``run_once``."""
