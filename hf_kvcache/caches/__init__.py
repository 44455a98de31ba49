"""Cache strategies, one module each."""
