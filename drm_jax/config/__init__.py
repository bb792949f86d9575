"""mergekit configs planned and run (below `drm_jax.cli`, above `drm_jax.engine` and `drm_jax.io`)."""
