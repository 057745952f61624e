"""Thin HTTP handlers for the distribution API; they parse, call the router's registry, and render."""
