"""Datasets of the method: the evaluation pairs (test_pairs) and, with training, the cross-view pairs."""
