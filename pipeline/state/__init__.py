"""Campaign state: the bookkeeping of labels, walkers, members and versions, and the run
directory."""
