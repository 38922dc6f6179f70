"""Compute-optimal planning, scaling-law fits and their plots."""
