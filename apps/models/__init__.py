"""Model backends: the ensembles, their graphs, and the ensemble as an ASE calculator."""
