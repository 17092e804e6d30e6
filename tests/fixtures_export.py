"""Fixtures of the export area."""
