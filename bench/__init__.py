"""galip.bench."""
