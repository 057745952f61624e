"""Talking to upstream registries: sessions, token auth, redirects, retries."""
