"""blip models (named sizes register on import)."""
