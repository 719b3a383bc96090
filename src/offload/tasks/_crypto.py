"""Built-in crypto tasks: hashing, password hashing, authenticated encryption.

``crypto:hash``, ``crypto:hash_password`` and ``crypto:verify_password`` (scrypt) use only the
standard library and run on every worker kind. ``argon2id`` password hashes and
``crypto:encrypt`` / ``crypto:decrypt`` (AES-256-GCM) need ``cryptography``, which does not load
in an isolated subinterpreter: the encryption types are declared process-only, and an argon2id
hash requested in a subinterpreter fails with ``UnsupportedKind``.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal, overload

from .._registry import task
from ..errors import DecryptFailed, InvalidInput
from ._common import (
    NEEDS_CRYPTOGRAPHY,
    PROCESS_KINDS,
    as_bytes,
    check_int,
    optional_import,
    shown,
    unpack,
)

__all__ = (
    "ENVELOPE_HEADER",
    "HASH_ALGORITHMS",
    "decrypt",
    "digest",
    "encrypt",
    "hash_password",
    "verify_password",
)

# --- crypto:hash --------------------------------------------------------------------------

#: ``algorithm`` names ``crypto:hash`` accepts (``-`` may be used for ``_``, any case).
HASH_ALGORITHMS: Final = frozenset(
    {"sha256", "sha384", "sha512", "sha3_256", "sha3_512", "blake2b", "blake2s"}
)


@overload
def digest(data: bytes | str, *, algorithm: str = ..., output: Literal["hex"] = ...) -> str: ...
@overload
def digest(data: bytes | str, *, algorithm: str = ..., output: Literal["raw"]) -> bytes: ...
def digest(
    data: bytes | str, *, algorithm: str = "sha256", output: Literal["hex", "raw"] = "hex"
) -> str | bytes:
    """The digest of ``data`` (a ``str`` is hashed as UTF-8), hex by default.

    >>> digest("abc")[:16]
    'ba7816bf8f01cfea'
    >>> len(digest(b"abc", algorithm="blake2b", output="raw"))
    64

    ``algorithm`` is one of ``sha256`` (default), ``sha384``, ``sha512``, ``sha3_256``,
    ``sha3_512``, ``blake2b``, ``blake2s``; anything else is ``InvalidInput``.
    """
    import hashlib

    payload = as_bytes(data, "data")
    name = _hash_name(algorithm)
    if output not in ("hex", "raw"):
        raise InvalidInput("output must be 'hex' or 'raw'")
    hasher = hashlib.new(name, payload)
    return hasher.hexdigest() if output == "hex" else hasher.digest()


def _hash_name(algorithm: object) -> str:
    if not isinstance(algorithm, str):
        raise InvalidInput(f"algorithm must be a string, not {type(algorithm).__name__}")
    name = algorithm.strip().lower().replace("-", "_")
    if name not in HASH_ALGORITHMS:
        raise InvalidInput(
            f"unsupported hash algorithm {shown(algorithm)}; use one of {sorted(HASH_ALGORITHMS)}"
        )
    return name


@task("crypto:hash")
def _hash_task(data: Any) -> str | bytes:
    args = unpack(data, "crypto:hash", ("data",), ("algorithm", "output"))
    output = args.get("output", "hex")
    if output == "raw":
        return digest(args["data"], algorithm=args.get("algorithm", "sha256"), output="raw")
    if output != "hex":
        raise InvalidInput("crypto:hash: output must be 'hex' or 'raw'")
    return digest(args["data"], algorithm=args.get("algorithm", "sha256"))


# --- crypto:hash_password / crypto:verify_password -----------------------------------------

PasswordScheme = Literal["scrypt", "argon2id"]

# scrypt default: N=2**16, r=8, p=2 (64 MiB): an OWASP-listed equivalent of N=2**17, p=1.
SCRYPT_N: Final = 2**16
SCRYPT_R: Final = 8
SCRYPT_P: Final = 2
# argon2id default: RFC 9106 section 4, second recommended option (64 MiB, t=3, p=4).
ARGON2_MEMORY_KIB: Final = 2**16
ARGON2_TIME: Final = 3
ARGON2_LANES: Final = 4

_SALT_BYTES: Final = 16
_HASH_BYTES: Final = 32
_MAX_MEMORY: Final = 1 << 30  # cost ceilings, also applied to hashes read back (DoS guard)

_SCRYPT_PATTERN: Final = (
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/]*)\$([A-Za-z0-9+/]+)"
)
_ARGON2_PATTERN: Final = (
    r"\$argon2id\$v=(\d{1,3})\$m=(\d{1,8}),t=(\d{1,4}),p=(\d{1,3})\$([A-Za-z0-9+/]+)"
    r"\$([A-Za-z0-9+/]+)"
)


def hash_password(
    password: str | bytes,
    *,
    scheme: PasswordScheme = "scrypt",
    n: int | None = None,
    r: int | None = None,
    p: int | None = None,
    time_cost: int | None = None,
    memory_cost: int | None = None,
    parallelism: int | None = None,
) -> str:
    """Hash a password with a random salt into a self-describing string.

    >>> encoded = hash_password("hunter2", n=2**10)
    >>> encoded.startswith("$scrypt$ln=10,r=8,p=2$")
    True
    >>> verify_password("hunter2", encoded)
    True

    ``scheme="scrypt"`` (default; ``n``, ``r``, ``p``, default ``2**16, 8, 2``) gives
    ``$scrypt$ln=16,r=8,p=2$<salt>$<hash>``; ``scheme="argon2id"`` (``time_cost``,
    ``memory_cost`` in KiB, ``parallelism``; default RFC 9106's ``3, 65536, 4``) gives the
    standard PHC string ``$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>``. Salt and hash are
    base64 without padding. argon2id needs ``cryptography`` (process workers only).
    """
    import secrets

    secret = as_bytes(password, "password")
    salt = secrets.token_bytes(_SALT_BYTES)
    if scheme == "scrypt":
        if time_cost is not None or memory_cost is not None or parallelism is not None:
            raise InvalidInput("scrypt takes n, r and p (time_cost etc. are for argon2id)")
        n_ = SCRYPT_N if n is None else check_int(n, "n", 2, 1 << 20)
        if n_ & (n_ - 1):
            raise InvalidInput("n must be a power of two")
        r_ = SCRYPT_R if r is None else check_int(r, "r", 1, 64)
        p_ = SCRYPT_P if p is None else check_int(p, "p", 1, 64)
        _check_scrypt_cost(n_, r_, p_)
        derived = scrypt(secret, salt, n=n_, r=r_, p=p_, length=_HASH_BYTES)
        return f"$scrypt$ln={n_.bit_length() - 1},r={r_},p={p_}${_b64(salt)}${_b64(derived)}"
    if scheme == "argon2id":
        if n is not None or r is not None or p is not None:
            raise InvalidInput("argon2id takes time_cost, memory_cost and parallelism")
        t_ = ARGON2_TIME if time_cost is None else check_int(time_cost, "time_cost", 1, 100)
        lanes = (
            ARGON2_LANES if parallelism is None else check_int(parallelism, "parallelism", 1, 64)
        )
        m_ = (
            ARGON2_MEMORY_KIB
            if memory_cost is None
            else check_int(memory_cost, "memory_cost", 8 * lanes, _MAX_MEMORY // 1024)
        )
        if m_ < 8 * lanes:
            raise InvalidInput("memory_cost must be at least 8 KiB per lane")
        derived = _argon2id(secret, salt, t_, m_, lanes, _HASH_BYTES)
        return f"$argon2id$v=19$m={m_},t={t_},p={lanes}${_b64(salt)}${_b64(derived)}"
    raise InvalidInput("scheme must be 'scrypt' or 'argon2id'")


def verify_password(password: str | bytes, hash: str | bytes) -> bool:
    """Whether ``password`` matches ``hash`` (from :func:`hash_password`); constant-time.

    >>> verify_password("wrong", hash_password("hunter2", n=2**10))
    False

    A ``hash`` that is not a well-formed scrypt or argon2id string, or whose cost parameters
    exceed offload's ceilings, is ``InvalidInput``.
    """
    import hmac

    secret = as_bytes(password, "password")
    encoded = _ascii(hash)
    if encoded.startswith("$scrypt$"):
        match = re.fullmatch(_SCRYPT_PATTERN, encoded)
        if match is None:
            raise InvalidInput("hash is not a well-formed $scrypt$ string")
        log_n, r_, p_ = (int(group) for group in match.group(1, 2, 3))
        if not 1 <= log_n <= 20 or not 1 <= r_ <= 64 or not 1 <= p_ <= 64:
            raise InvalidInput("hash has out-of-range scrypt parameters")
        _check_scrypt_cost(1 << log_n, r_, p_)
        salt, expected = _unb64(match.group(4)), _unb64(match.group(5))
        if not 16 <= len(expected) <= 128:
            raise InvalidInput("hash has an unsupported scrypt hash length")
        derived = scrypt(secret, salt, n=1 << log_n, r=r_, p=p_, length=len(expected))
    elif encoded.startswith("$argon2id$"):
        match = re.fullmatch(_ARGON2_PATTERN, encoded)
        if match is None:
            raise InvalidInput("hash is not a well-formed $argon2id$ string")
        version, m_, t_, lanes = (int(group) for group in match.group(1, 2, 3, 4))
        if version != 19:
            raise InvalidInput("hash has an unsupported argon2 version (only v=19)")
        if not 1 <= t_ <= 100 or not 1 <= lanes <= 64 or not 8 * lanes <= m_ <= _MAX_MEMORY // 1024:
            raise InvalidInput("hash has out-of-range argon2id parameters")
        salt, expected = _unb64(match.group(5)), _unb64(match.group(6))
        if len(salt) < 8 or not 16 <= len(expected) <= 128:
            raise InvalidInput("hash has an unsupported argon2id salt or hash length")
        derived = _argon2id(secret, salt, t_, m_, lanes, len(expected))
    else:
        raise InvalidInput("hash is not a $scrypt$ or $argon2id$ password hash")
    return hmac.compare_digest(derived, expected)


def scrypt(password: bytes, salt: bytes, *, n: int, r: int, p: int, length: int) -> bytes:
    """Raw scrypt (RFC 7914) through ``hashlib.scrypt``, with enough ``maxmem`` for the cost.

    >>> scrypt(b"", b"", n=16, r=1, p=1, length=8).hex()
    '77d6576238657b20'
    """
    import hashlib

    # OpenSSL needs 128*r*(N+2) for V plus 128*r*p for B; add slack for its bookkeeping.
    maxmem = 128 * r * (n + 2 + p) + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=length, maxmem=maxmem)


def _check_scrypt_cost(n: int, r: int, p: int) -> None:
    if 128 * r * n > _MAX_MEMORY or p * r >= 1 << 30:
        raise InvalidInput("scrypt cost is too high (128*r*n must be at most 1 GiB)")


def _argon2id(
    secret: bytes, salt: bytes, time_cost: int, memory_kib: int, lanes: int, length: int
) -> bytes:
    with optional_import("cryptography", "crypto", NEEDS_CRYPTOGRAPHY):
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    kdf = Argon2id(
        salt=salt, length=length, iterations=time_cost, lanes=lanes, memory_cost=memory_kib
    )
    return kdf.derive(secret)


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    import base64
    import binascii

    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        pass
    raise InvalidInput("hash has invalid base64")


def _ascii(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("ascii")
        except UnicodeDecodeError:
            pass
        raise InvalidInput("hash must be ASCII")
    if not isinstance(value, str):
        raise InvalidInput(f"hash must be a str, not {type(value).__name__}")
    return value


_HASH_OPTIONS: Final = ("scheme", "n", "r", "p", "time_cost", "memory_cost", "parallelism")


def _argon2_needs_a_process(data: Any) -> tuple[str, ...] | None:
    """argon2id comes from cryptography, which does not load in a subinterpreter."""
    if not isinstance(data, dict):
        return None
    stored = data.get("hash")
    if data.get("scheme") == "argon2id" or (
        isinstance(stored, str) and stored.startswith("$argon2id$")
    ):
        return PROCESS_KINDS
    return None


@task("crypto:hash_password", kinds_for=_argon2_needs_a_process, why_not=NEEDS_CRYPTOGRAPHY)
def _hash_password_task(data: Any) -> str:
    args = unpack(data, "crypto:hash_password", ("password",), _HASH_OPTIONS)
    return hash_password(args.pop("password"), **args)


@task("crypto:verify_password", kinds_for=_argon2_needs_a_process, why_not=NEEDS_CRYPTOGRAPHY)
def _verify_password_task(data: Any) -> bool:
    args = unpack(data, "crypto:verify_password", ("password", "hash"))
    return verify_password(args["password"], args["hash"])


# --- crypto:encrypt / crypto:decrypt ------------------------------------------------------

#: The first bytes of every envelope: ``b"OFE"`` and the format version (1).
ENVELOPE_HEADER: Final = b"OFE\x01"
_NONCE_BYTES: Final = 12
_TAG_BYTES: Final = 16
_KEY_BYTES: Final = 32


def encrypt(plaintext: bytes | str, key: bytes, *, aad: bytes | str | None = None) -> bytes:
    """AES-256-GCM encrypt ``plaintext`` (a ``str`` as UTF-8) under a 32-byte ``key``.

    >>> key = bytes(32)
    >>> box = encrypt(b"attack at dawn", key, aad=b"user:42")
    >>> box[:4], len(box) - len(b"attack at dawn")
    (b'OFE\\x01', 32)
    >>> decrypt(box, key, aad=b"user:42")
    b'attack at dawn'

    The envelope is ``ENVELOPE_HEADER (4 bytes) | nonce (12, random) | ciphertext | tag (16)``;
    the header is authenticated together with ``aad``. With random nonces, rotate the key
    well before 2**32 messages.
    """
    import secrets

    data = as_bytes(plaintext, "plaintext")
    key_bytes = _aes_key(key)
    extra = b"" if aad is None else as_bytes(aad, "aad")
    nonce = secrets.token_bytes(_NONCE_BYTES)
    sealed = aes_gcm_seal(key_bytes, nonce, data, ENVELOPE_HEADER + extra)
    return ENVELOPE_HEADER + nonce + sealed


def decrypt(ciphertext: bytes, key: bytes, *, aad: bytes | str | None = None) -> bytes:
    """Open an :func:`encrypt` envelope; any tampering is ``DecryptFailed``.

    >>> decrypt(encrypt("hi", bytes(32)), bytes(32))
    b'hi'

    A modified, truncated or foreign envelope, the wrong key or the wrong ``aad`` all raise
    ``DecryptFailed`` (code ``DECRYPT_FAILED``) without saying which.
    """
    box = as_bytes(ciphertext, "ciphertext", allow_str=False)
    key_bytes = _aes_key(key)
    extra = b"" if aad is None else as_bytes(aad, "aad")
    head = len(ENVELOPE_HEADER)
    if len(box) < head + _NONCE_BYTES + _TAG_BYTES or box[:head] != ENVELOPE_HEADER:
        raise DecryptFailed("ciphertext is truncated or not an offload envelope")
    nonce = box[head : head + _NONCE_BYTES]
    return aes_gcm_open(key_bytes, nonce, box[head + _NONCE_BYTES :], ENVELOPE_HEADER + extra)


def aes_gcm_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Raw AES-GCM: ``ciphertext || tag`` (no envelope). For known-answer tests and interop."""
    with optional_import("cryptography", "crypto", NEEDS_CRYPTOGRAPHY):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aes_gcm_open(key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Raw AES-GCM decryption of ``ciphertext || tag``; failure is ``DecryptFailed``."""
    with optional_import("cryptography", "crypto", NEEDS_CRYPTOGRAPHY):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        pass
    raise DecryptFailed("decryption failed: wrong key, wrong aad, or tampered ciphertext")


def _aes_key(key: object) -> bytes:
    if isinstance(key, str):
        raise InvalidInput("key must be 32 raw bytes, not str (decode your hex/base64 key first)")
    raw = as_bytes(key, "key", allow_str=False)
    if len(raw) != _KEY_BYTES:
        raise InvalidInput(f"key must be exactly {_KEY_BYTES} bytes, not {len(raw)}")
    return raw


@task("crypto:encrypt", kinds=PROCESS_KINDS, why_not=NEEDS_CRYPTOGRAPHY)
def _encrypt_task(data: Any) -> bytes:
    args = unpack(data, "crypto:encrypt", ("plaintext", "key"), ("aad",))
    return encrypt(args["plaintext"], args["key"], aad=args.get("aad"))


@task("crypto:decrypt", kinds=PROCESS_KINDS, why_not=NEEDS_CRYPTOGRAPHY)
def _decrypt_task(data: Any) -> bytes:
    args = unpack(data, "crypto:decrypt", ("ciphertext", "key"), ("aad",))
    return decrypt(args["ciphertext"], args["key"], aad=args.get("aad"))
