"""Providers: one module per provider, the registry that opens them by name, the HTTP client (the one
place one is made), retries and rate limits. May import runner.core (and, lazily, runner.simulator)."""
