"""Values the ranks exchange through torchrun's store, sealed with the run's token (HMAC-SHA256, RFC 2104).

The store has no authentication: anyone who reaches its port can write any bytes under any key. So a sealed value
is ``<64 hex digits of the HMAC>\\n<JSON body>``, the HMAC keyed by the run's token over the run id, the scope (the
restart group's nonce, ``""`` for the first group and for keys every group shares), the store key and the body's
raw bytes. :meth:`Sealer.open` checks the size bound and then the HMAC *before* it parses anything: bytes written by
anyone without the token are never handed to a parser (a JSON nesting a hundred thousand levels deep cannot raise
out of it), and a value sealed for another key, run or restart group does not open here.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from dspark_lab.runtime.limits import MAX_STORE_VALUE

MAC_LEN = 64  # hex digits of an HMAC-SHA256


class Sealer:
    """Seals and opens store values with the run's token, for one scope (a restart group's nonce)."""

    def __init__(self, token: str, run_id: str, scope: str = ""):
        self._key = token.encode()
        self._run = run_id
        self.scope = scope

    def scoped(self, scope: str) -> Sealer:
        """The same token and run, for the keys of the restart group named ``scope``."""
        return Sealer(self._key.decode(), self._run, scope)

    def _mac(self, key: str, body: bytes) -> bytes:
        head = f"{self._run}\n{self.scope}\n{key}\n".encode()
        return hmac.new(self._key, head + body, hashlib.sha256).hexdigest().encode()

    def seal(self, key: str, value: Any) -> bytes:
        body = json.dumps(value, sort_keys=True).encode()
        return self._mac(key, body) + b"\n" + body

    def open(self, key: str, raw: bytes | str) -> Any:
        """The value sealed at ``key``; ValueError when it is too big, not sealed with this token for this key and
        scope, or (never for a value this class sealed) not JSON. Nothing is parsed before the HMAC matched."""
        if isinstance(raw, str):
            raw = raw.encode()
        if len(raw) > MAX_STORE_VALUE:
            raise ValueError(f"{len(raw)} bytes, over the {MAX_STORE_VALUE}-byte limit")
        mac, sep, body = raw[:MAC_LEN], raw[MAC_LEN:MAC_LEN + 1], raw[MAC_LEN + 1:]
        if sep != b"\n" or not hmac.compare_digest(mac, self._mac(key, body)):
            raise ValueError("its HMAC does not match the run's token (for this key and group)")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ValueError("sealed, but not JSON") from None
