"""Classifying stored features: the ImageNet head, linear probes and their training, k-NN,
labels, metrics.

Named ``classification`` (not ``classify``) so that the subpackage never shadows the public
function ``embedkit.classify``.
"""
