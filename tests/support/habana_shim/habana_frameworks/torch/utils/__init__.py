"""Real: bridge utilities."""
