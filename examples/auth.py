"""Sign and verify a JWT, hash and check a password, all on worker processes.

Needs the ``jwt`` extra (PyJWT and cryptography). From the offload checkout::

    pip install '.[jwt]'
    python examples/auth.py

The CPU-heavy parts (scrypt, signatures) run in a WorkerManager's workers, so the event loop
stays free for other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import sys

import offload
from offload import builtins


async def main() -> None:
    signing_key = secrets.token_bytes(32)  # in real life: from your secret store

    async with offload.WorkerManager(workers=2, kind="process", max_queue=100) as wm:
        # JWT: sign with a typed shortcut, verify with a plain dict task.
        token = await builtins.jwt_sign(
            wm, {"sub": "alice", "aud": "api"}, signing_key, algorithm="HS256", expires_in=3600
        )
        print("token issued:", token.count(".") == 2)
        result = await wm.execute_task(
            {
                "type": "jwt:verify",
                "data": {
                    "token": token,
                    "key": signing_key,
                    "algorithms": ["HS256"],
                    "audience": "api",
                },
                "priority": "high",
                "timeout": 10,
            }
        )
        print(f"token valid: {result['valid']}, subject: {result['claims']['sub']}")

        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        result = await builtins.jwt_verify(
            wm, forged, signing_key, algorithms=["HS256"], audience="api"
        )
        print(f"forged token valid: {result['valid']}, reason: {result['reason']}")

        # Passwords: scrypt with a random salt, stored as one self-describing string.
        stored = await builtins.hash_password(wm, "correct horse battery staple", timeout=10)
        print("password hash scheme:", stored.split("$")[1])
        ok = await builtins.verify_password(wm, "correct horse battery staple", stored)
        print("right password accepted:", ok)
        ok = await builtins.verify_password(wm, "Tr0ub4dor&3", stored)
        print("wrong password accepted:", ok)


if __name__ == "__main__":
    if importlib.util.find_spec("jwt") is None:
        sys.exit("examples/auth.py needs the jwt extra: pip install '.[jwt]' (from the checkout)")
    asyncio.run(main())
