"""Datasets: labelled structures as flat arrays on disk."""
