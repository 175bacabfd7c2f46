"""Architecture symmetry descriptions (data) and their binding to checkpoints."""
