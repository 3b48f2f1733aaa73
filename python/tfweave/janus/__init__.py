"""tfweave.janus (being built)."""
