"""The engine: the coordinator, its agents, the task loop, and the stop rules."""
