"""The `drm-jax` command line (top of the dependency tree: it may import everything below it)."""
