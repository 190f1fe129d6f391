"""Flax NNX backbone families, one per file, attribute names mirroring timm's module tree."""
