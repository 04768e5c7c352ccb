"""Lightning plumbing around the pure model code."""
