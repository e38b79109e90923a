"""secant SDK."""
