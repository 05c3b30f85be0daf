"""Lifeboat's benchmark suite: `python -m bench [--quick] [--size 1G] [--reps 3]` (see bench/README.md).

Every figure is a ratio of Lifeboat against a reference measured in the same run, side by side,
with the median of several repetitions: the machines are shared and noisy.
"""
