"""vlmo models (named sizes register on import)."""
