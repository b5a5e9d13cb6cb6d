"""Data: manifests, PyAV decoding, features, datasets, collation, samplers, noise."""
