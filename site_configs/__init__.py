"""Site configs shipped with palflow, found by name (``--site laptop.py``)."""
