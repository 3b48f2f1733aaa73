"""tfweave.serving (being built)."""
