"""Deterministic synthetic data in every layout patchserve reads.

Torch-free (numpy, Pillow, h5py, tifffile), so it sits in the bottom layer:
tests, benchmarks and the demo of every layer above can make their data.
"""
