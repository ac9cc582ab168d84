"""Every name relier writes into a task message or a request, in one place: message headers
(they travel with the message, through every broker and republish), ``delivery_info`` keys
(set on a message this process received) and request keys (set on a request handed to the
pool). Relier's own names start with ``rl_``; ``relier_schema`` and ``idempotency_key`` keep
the names published messages already carry.
"""

from __future__ import annotations

# -- message headers --------------------------------------------------------------------

# Every republish by relier raises this; it orders deliveries of one task id (Generation).
RESURRECTIONS_HEADER = "rl_resurrections"
# Only republishes after a worker died holding the task raise this; max_resurrections bounds
# it. A hand-off at a clean shutdown or after a consumer restart is not the task's fault.
CRASHES_HEADER = "rl_crashes"
# Stamped fresh on every publication by an app with relier enabled (signals.py), never copied
# from a request: a broker redelivery or a relier republish (resurrection, hand-off, DLQ
# release) carries the message's headers unchanged, so the same value, while a deliberate
# re-publication by Celery under the same task id (Task.replace, a re-applied frozen
# signature, apply_async(task_id=...) again) goes through before_task_publish: a new value.
PUBLICATION_HEADER = "rl_pub"
# Celery's own header: how many Task.replace() calls deep this message is (0 when not a
# replacement). The fallback identity of a message published without relier.
NESTING_HEADER = "replaced_task_nesting"
# The task's schema version (no header means 1), see envelope.py.
SCHEMA_HEADER = "relier_schema"
# How many times a message from a newer schema was requeued for a newer worker.
REQUEUES_HEADER = "rl_schema_requeues"
# An explicit idempotency key given at dispatch (``push(..., idempotency_key=...)``).
IDEMPOTENCY_HEADER = "idempotency_key"
# Set by a DLQ release: the operator approves repeating an interrupted run.
RERUN_HEADER = "rl_rerun_interrupted"

# -- delivery_info keys (one delivery, this process) -------------------------------------

# Set by the reliable fetch on a message it took: its field in the worker's held hash and the
# queue list it came from.
FETCH_FIELD = "rl_field"
FETCH_QUEUE = "rl_queue"
# The lease epoch when the fetch was sent: a reply read after the lease was lost (the worker
# froze between Redis taking the message and the loop reading the reply) is not this lease's.
FETCH_EPOCH = "rl_fetch_epoch"
# On a fetched message relier took over: relier, not Celery's ack, removes its record when
# the task ends (FETCH_FIELD and FETCH_QUEUE say where it is held and came from).
PROTECTED = "rl_protected"

# -- request keys (the pool process reads them as ``task.request.<key>``) ----------------

# The lease epoch a request was received under (lease.gate), and the worker id and held field
# its completion drops (completion.py): [worker, field] for a fetched delivery; for one kept
# apart from the broker (RabbitMQ, kombu's fetch) also its delivery id, retries and
# resurrections, [worker, field, delivery, retries, resurrections], for complete.lua.
EPOCH_KEY = "rl_epoch"
HELD_KEY = "rl_held"
