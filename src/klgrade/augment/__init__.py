"""Training-time augmentation and site-shift renders."""
