"""galip.export."""
