"""The top layer: the ``patchserve`` command line and the demo, nothing else."""
