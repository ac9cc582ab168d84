"""Recovery primitives: the lease, the in-flight registry, resurrection, fencing, drain, the
dead-letter queue and the message envelope. They act on what they are given (config, store,
worker id); the Celery wiring calls them."""
