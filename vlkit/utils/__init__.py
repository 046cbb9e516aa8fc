"""Small helpers shared across vlkit."""
