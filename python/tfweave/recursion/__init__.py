"""tfweave.recursion (being built)."""
