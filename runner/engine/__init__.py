"""The run phase: one request's life (reserve, send, retry, settle), a worker's membership in a run
(heartbeat, claims, take-over) and stopping (signals, deadline, drain). May import runner.ledger,
runner.providers and runner.core."""
