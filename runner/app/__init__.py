"""Use cases: run, resume, estimate, sweep, the pre-flight (cache, quotes, budget check), reconcile,
export and reports. May import runner.engine, runner.ledger, runner.providers and runner.core."""
