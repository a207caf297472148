"""Oracle libraries: calculator factory helpers, process isolation, CP2K, fault injection."""
