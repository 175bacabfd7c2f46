"""Merge methods (pure, per tensor) and the streaming checkpoint merger."""
