"""Data fixtures (synthetic patches, slides)."""
