"""Synthetic data for tests, benchmarks and the demo: tomograms with ground truth, CryoSiam-layout
checkpoints, Hypothesis strategies. Nothing here is used by a run on real data."""
