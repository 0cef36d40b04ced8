"""Helpers that write test fixtures (random-weight model folders); not used by the runtime."""
