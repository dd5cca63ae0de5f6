"""Frozen embedders and the embedding store."""
