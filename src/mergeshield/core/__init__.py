"""The pure numeric core: permutations, scales, assignment, merges on tensors."""
