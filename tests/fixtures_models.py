"""Model fixtures (checkpoints, exported repositories, running servers)."""
