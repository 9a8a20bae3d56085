"""Data layer: the phantom, manifests, reading, datasets and view sampling."""
