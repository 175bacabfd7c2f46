"""Checkpoint reading and atomic writing."""
