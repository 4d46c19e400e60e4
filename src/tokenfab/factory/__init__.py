"""factory."""
