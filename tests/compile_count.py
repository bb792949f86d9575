"""Counting XLA compilations, for the tests that a sweep of traced numbers compiles nothing new."""

import contextlib

import jax


@contextlib.contextmanager
def counting_compiles():
    """Counts XLA backend compilations while active (jax.monitoring's compile-time event): yields [count]."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
