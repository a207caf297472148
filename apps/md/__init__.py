"""Molecular dynamics: batched integrators for the generators."""
