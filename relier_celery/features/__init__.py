"""Per-task features: idempotency, admission, timeouts, the task context, async tasks and
``push``/``rl_task``. Each acts on one task or one dispatch."""
