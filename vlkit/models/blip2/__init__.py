"""blip2 models (named sizes register on import)."""
