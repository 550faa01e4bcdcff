"""galip.train."""
