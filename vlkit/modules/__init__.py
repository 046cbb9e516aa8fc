"""Building blocks: layers, encoders, losses."""
