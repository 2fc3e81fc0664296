"""Synthetic bone-marrow aspirate slides with ground truth, for tests, demos and benchmarks."""
