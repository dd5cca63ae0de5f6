"""The model's input view: image files -> canonical uint8 views (and their cache, batches)."""
