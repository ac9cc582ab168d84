"""Redis commands of idempotent tasks and locks (features/idempotency.py)."""

from __future__ import annotations

from typing import Any

from relier_celery.store.connection import Connection, ms

__all__ = ["IdempotencyCommands"]


class IdempotencyCommands(Connection):
    """Claim, store and release an idempotency key."""

    def idem_claim(
        self, key: str, lease: str, owner: str, args_hash: str, ttl: float, on_crash: str = "rerun"
    ) -> list[Any]:
        k = self.keys
        return list(
            self._run(
                "idem_claim",
                [k.idempotency(key), k.leases, k.fence],
                [lease, owner, args_hash, ms(ttl), on_crash],
            )
        )

    def idem_store(self, key: str, token: str, result: str, ttl: float) -> bool:
        out = self._run("idem_store", [self.keys.idempotency(key)], [token, result, ms(ttl)])
        return bool(out)

    def idem_release(self, key: str, token: str) -> bool:
        return bool(self._run("idem_release", [self.keys.idempotency(key)], [token]))
