"""The `runner` command line and what it shows (tables, progress, the HTML report). The only place
that prints; nothing imports it."""
