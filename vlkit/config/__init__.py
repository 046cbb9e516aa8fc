"""Typed training configs: dataclass schemas, YAML loading, ``key=value`` overrides, validation."""
