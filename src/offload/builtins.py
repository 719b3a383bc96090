"""Typed ``async`` shortcuts for offload's built-in task types.

Each function takes the manager first, runs one dict task on it and returns the typed
result::

    import offload
    from offload import builtins

    async with offload.WorkerManager(workers=2) as wm:
        token = await builtins.jwt_sign(wm, {"sub": "42"}, pem_private_key,
                                        algorithm="RS256", expires_in=3600)
        result = await builtins.jwt_verify(wm, token, pem_public_key, algorithms=["RS256"])

Every function also takes the keyword options ``priority`` (``"high"``, ``"normal"``,
``"low"``) and ``timeout`` (seconds). The same work is available as dict tasks
(``{"type": "jwt:sign", "data": {...}}``) and as plain functions in :mod:`offload.tasks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from . import tasks as _tasks  # noqa: F401  (registers the built-in task types; cheap)
from .errors import InvalidInput

if TYPE_CHECKING:
    from offload import WorkerManager
    from offload._task import PriorityLike
    from offload.tasks import JSONValue, JwtVerifyResult

__all__ = (
    "compress",
    "decompress",
    "decrypt",
    "encrypt",
    "hash",
    "hash_password",
    "json_transform",
    "jwt_sign",
    "jwt_verify",
    "verify_password",
)

Codec = Literal["zstd", "gzip"]


async def _run(
    wm: WorkerManager,
    type_: str,
    data: dict[str, Any],
    priority: PriorityLike,
    timeout: float | None,
) -> Any:
    return await wm.execute_task(
        {"type": type_, "data": data, "priority": priority, "timeout": timeout}
    )


def _codec(algorithm: object) -> str:
    if algorithm not in ("zstd", "gzip"):
        raise InvalidInput("algorithm must be 'zstd' or 'gzip'")
    return str(algorithm)


def _options(**values: Any) -> dict[str, Any]:
    """Only the options that were given (so the task's own defaults apply to the rest)."""
    return {key: value for key, value in values.items() if value is not None}


async def jwt_sign(
    wm: WorkerManager,
    claims: Mapping[str, Any],
    key: str | bytes,
    *,
    algorithm: str = "HS256",
    expires_in: float | None = None,
    headers: Mapping[str, Any] | None = None,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> str:
    """Sign ``claims`` into a JWT (``jwt:sign``).

    >>> token = await jwt_sign(  # doctest: +SKIP
    ...     wm, {"sub": "42"}, pem_private_key, algorithm="RS256", expires_in=3600
    ... )

    ``key``: the shared secret for HS256/384/512, a PEM private key for RS256, ES256, EdDSA.
    """
    data = {"claims": dict(claims), "key": key, "algorithm": algorithm}
    data |= _options(expires_in=expires_in, headers=None if headers is None else dict(headers))
    return cast(str, await _run(wm, "jwt:sign", data, priority, timeout))


async def jwt_verify(
    wm: WorkerManager,
    token: str,
    key: str | bytes,
    *,
    algorithms: Sequence[str],
    audience: str | Sequence[str] | None = None,
    issuer: str | Sequence[str] | None = None,
    leeway: float = 0,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> JwtVerifyResult:
    """Verify a JWT (``jwt:verify``); a bad token is a result, not an exception.

    >>> result = await jwt_verify(wm, token, pem_public, algorithms=["RS256"])  # doctest: +SKIP
    >>> result["valid"], result["reason"]  # doctest: +SKIP
    (False, 'expired')
    """
    data: dict[str, Any] = {"token": token, "key": key, "algorithms": list(algorithms)}
    data |= _options(
        audience=audience if audience is None or isinstance(audience, str) else list(audience),
        issuer=issuer if issuer is None or isinstance(issuer, str) else list(issuer),
    )
    if leeway:
        data["leeway"] = leeway
    return cast("JwtVerifyResult", await _run(wm, "jwt:verify", data, priority, timeout))


@overload
async def hash(
    wm: WorkerManager,
    data: bytes | str,
    algorithm: str = ...,
    *,
    output: Literal["hex"] = ...,
    priority: PriorityLike = ...,
    timeout: float | None = ...,
) -> str: ...
@overload
async def hash(
    wm: WorkerManager,
    data: bytes | str,
    algorithm: str = ...,
    *,
    output: Literal["raw"],
    priority: PriorityLike = ...,
    timeout: float | None = ...,
) -> bytes: ...
async def hash(
    wm: WorkerManager,
    data: bytes | str,
    algorithm: str = "sha256",
    *,
    output: Literal["hex", "raw"] = "hex",
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> str | bytes:
    """Hash ``data`` (``crypto:hash``): hex by default, ``output="raw"`` for bytes.

    >>> await hash(wm, b"abc", "sha3_256")  # doctest: +SKIP
    '3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532'
    """
    payload = {"data": data, "algorithm": algorithm, "output": output}
    return cast("str | bytes", await _run(wm, "crypto:hash", payload, priority, timeout))


async def hash_password(
    wm: WorkerManager,
    password: str | bytes,
    *,
    scheme: Literal["scrypt", "argon2id"] = "scrypt",
    n: int | None = None,
    r: int | None = None,
    p: int | None = None,
    time_cost: int | None = None,
    memory_cost: int | None = None,
    parallelism: int | None = None,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> str:
    """Hash a password (``crypto:hash_password``) into a self-describing string.

    >>> stored = await hash_password(wm, "hunter2")  # doctest: +SKIP
    >>> stored[:22]  # doctest: +SKIP
    '$scrypt$ln=16,r=8,p=2$'
    """
    data: dict[str, Any] = {"password": password, "scheme": scheme}
    data |= _options(
        n=n, r=r, p=p, time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
    )
    return cast(str, await _run(wm, "crypto:hash_password", data, priority, timeout))


async def verify_password(
    wm: WorkerManager,
    password: str | bytes,
    hash: str,
    *,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> bool:
    """Check ``password`` against a stored hash (``crypto:verify_password``), constant-time.

    >>> await verify_password(wm, "hunter2", stored)  # doctest: +SKIP
    True
    """
    data = {"password": password, "hash": hash}
    return cast(bool, await _run(wm, "crypto:verify_password", data, priority, timeout))


async def encrypt(
    wm: WorkerManager,
    plaintext: bytes | str,
    key: bytes,
    *,
    aad: bytes | str | None = None,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> bytes:
    """AES-256-GCM encrypt under a 32-byte key (``crypto:encrypt``); returns an envelope.

    >>> box = await encrypt(wm, b"secret", key, aad=b"user:42")  # doctest: +SKIP
    """
    data = {"plaintext": plaintext, "key": key} | _options(aad=aad)
    return cast(bytes, await _run(wm, "crypto:encrypt", data, priority, timeout))


async def decrypt(
    wm: WorkerManager,
    ciphertext: bytes,
    key: bytes,
    *,
    aad: bytes | str | None = None,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> bytes:
    """Open an :func:`encrypt` envelope (``crypto:decrypt``); tampering is ``DecryptFailed``.

    >>> await decrypt(wm, box, key, aad=b"user:42")  # doctest: +SKIP
    b'secret'
    """
    data = {"ciphertext": ciphertext, "key": key} | _options(aad=aad)
    return cast(bytes, await _run(wm, "crypto:decrypt", data, priority, timeout))


async def compress(
    wm: WorkerManager,
    data: bytes | str,
    algorithm: Codec = "zstd",
    *,
    level: int | None = None,
    dictionary: bytes | None = None,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> bytes:
    """Compress with ``"zstd"`` (default) or ``"gzip"`` (``compress:zstd``/``compress:gzip``).

    >>> frame = await compress(wm, b"a" * 10_000, "zstd", level=19)  # doctest: +SKIP

    ``dictionary`` is for zstd only.
    """
    payload: dict[str, Any] = {"data": data} | _options(level=level)
    if dictionary is not None:
        payload["dictionary"] = dictionary
    return cast(bytes, await _run(wm, f"compress:{_codec(algorithm)}", payload, priority, timeout))


async def decompress(
    wm: WorkerManager,
    data: bytes,
    algorithm: Codec = "zstd",
    *,
    max_output_size: int | None = None,
    dictionary: bytes | None = None,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> bytes:
    """Decompress, refusing more than ``max_output_size`` bytes (default 64 MiB).

    >>> await decompress(wm, frame, "zstd", max_output_size=1 << 20)  # doctest: +SKIP

    Too much output is ``OutputTooLarge``; a corrupt frame is ``InvalidInput``.
    """
    payload: dict[str, Any] = {"data": data} | _options(max_output_size=max_output_size)
    if dictionary is not None:
        payload["dictionary"] = dictionary
    return cast(
        bytes, await _run(wm, f"decompress:{_codec(algorithm)}", payload, priority, timeout)
    )


async def json_transform(
    wm: WorkerManager,
    document: JSONValue,
    transformer: str,
    *,
    priority: PriorityLike = "normal",
    timeout: float | None = None,
) -> JSONValue:
    """Apply a registered JSON transformer (``json:transform``).

    >>> await json_transform(wm, '{"b": 1, "a": 2}', "sort_keys")  # doctest: +SKIP
    {'a': 2, 'b': 1}
    """
    data = {"document": document, "transformer": transformer}
    return await _run(wm, "json:transform", data, priority, timeout)
