"""Resume and mending: the journal, rebuilding state on --resume, mending damage, warm starts."""
