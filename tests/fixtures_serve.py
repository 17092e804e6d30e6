"""Fixtures of the serve area."""
