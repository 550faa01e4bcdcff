"""galip.runtime."""
