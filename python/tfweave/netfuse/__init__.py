"""tfweave.netfuse (being built)."""
