"""Script calls whose keys are encoded once, not at every call (single Redis).

An apply call carries 8 keys per org and an outbox ack 2: at 200 orgs a call, redis-py encoded
1,600 arguments per call (a generator step, type checks and a copy each), work repeated for
the same keys at every call of every batch (BENCHMARKS.md, "Per-org cost of a script call").
An org's keys never change, so their wire form (RESP bulk strings) is built once per org and
the command is one ``bytes.join`` of cached pieces, sent on a pooled connection as it is.

On a Redis Cluster the client routes each command by its keys' slot; the engine keeps
redis-py's own script objects there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoScriptError, ResponseError

if TYPE_CHECKING:
    from redis.asyncio import Redis


def bulk(*values: bytes) -> bytes:
    """``values`` as RESP bulk strings, back to back (a part of a command)."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in values)


class PackedScript:
    """``EVALSHA`` of one script with pre-encoded keys; loads the script when Redis lost it
    (restart, ``SCRIPT FLUSH``), as redis-py's ``Script`` does."""

    def __init__(self, client: Redis, source: str) -> None:
        self._client = client
        self._source = source
        sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._head = bulk(b"EVALSHA", sha.encode())

    async def __call__(self, nkeys: int, keys: Iterable[bytes], args: Sequence[bytes]) -> Any:
        """Run the script: ``keys`` are pre-encoded pieces (:func:`bulk`) holding ``nkeys``
        keys in all, ``args`` plain values."""
        count = b"%d" % nkeys
        command = b"".join(
            (
                b"*%d\r\n" % (3 + nkeys + len(args)),
                self._head,
                b"$%d\r\n%s\r\n" % (len(count), count),
                *keys,
                bulk(*args),
            )
        )
        try:
            return await self._send(command)
        except NoScriptError:
            await self._client.script_load(self._source)
            return await self._send(command)

    async def _send(self, command: bytes) -> Any:
        pool = self._client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(command)
            return await conn.read_response()
        except ResponseError:
            raise  # an error reply: the connection is in step, it goes back to the pool
        except BaseException:
            # A reply may still be on its way (cancelled, timed out, broken): this connection
            # must never serve another command.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
