"""palflow: the coordinator, campaign settings and the command line."""
