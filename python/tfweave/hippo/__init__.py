"""tfweave.hippo (being built)."""
