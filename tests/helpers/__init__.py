"""Shared helpers for the tests (not collected as tests)."""
