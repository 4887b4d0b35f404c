"""Preprocessing: condition images, aesthetic scores, the reference dataset layout, the resumable runner."""
