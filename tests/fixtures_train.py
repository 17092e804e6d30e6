"""Fixtures of the train area."""
