"""Configuration: campaign settings, sites, model specs, and the whole pre-flight."""
