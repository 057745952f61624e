"""Access control and TLS: users, policies, tokens, the auth middleware and the HTTPS listener."""
