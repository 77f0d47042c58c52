"""Schemathesis hooks for the contract run (scripts/contract.sh).

A reused Idempotency-Key with a different body is refused with 422, as the IETF
Idempotency-Key draft asks; the generator reuses keys across unrelated bodies, so each
generated key gets a unique suffix (still 1 to 255 visible ASCII characters) and every
case is a first request.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"^[!-~]{1,255}$")


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    headers = case.headers or {}
    for name in list(headers):
        value = headers[name]
        # Only valid keys: an invalid one must still reach the service as generated.
        if name.lower() == "idempotency-key" and isinstance(value, str) and VALID_KEY.match(value):
            headers[name] = f"{value[:200]}-{uuid.uuid4().hex}"
    return None
