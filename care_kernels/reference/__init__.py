"""Torch references: the readable ground truth every kernel is tested against."""
