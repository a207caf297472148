"""Selection policies: the oracle queue, informativeness measures, strategies, metrology."""
