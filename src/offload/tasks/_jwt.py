"""Built-in JWT tasks (``jwt:sign``, ``jwt:verify``) on PyJWT, process workers only.

PyJWT imports ``cryptography`` when it is installed, and ``cryptography`` refuses to load in an
isolated subinterpreter, so even ``import jwt`` fails there (HS256 included). Both types are
declared ``kinds=("process", "dask")``.

Verification is strict: the caller names the allowed algorithms, ``none`` is never accepted,
the token's algorithm must be in the allow-list and must fit the key (an RSA public key is
never used as an HMAC secret), and ``exp``/``nbf``/``iat``/``aud``/``iss`` are checked. A bad
token is an answer, ``{"valid": False, "reason": ...}``, not an exception; bad *arguments*
(no allow-list, an unknown algorithm, a key that fits none of the allowed algorithms) are
``InvalidInput``. Keys and tokens never appear in messages.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, Literal, TypedDict

from .._registry import task
from ..errors import InvalidInput
from ._common import (
    NEEDS_CRYPTOGRAPHY,
    PROCESS_KINDS,
    as_bytes,
    optional_import,
    shown,
    unpack,
)

__all__ = ("JWT_ALGORITHMS", "JwtReason", "JwtVerifyResult", "jwt_sign", "jwt_verify")

#: The algorithms ``jwt:sign`` and ``jwt:verify`` support.
JWT_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"})
_HMAC: Final = frozenset({"HS256", "HS384", "HS512"})

JwtReason = Literal[
    "expired",
    "immature",
    "invalid_signature",
    "invalid_audience",
    "invalid_issuer",
    "algorithm_not_allowed",
    "malformed",
]


class JwtVerifyResult(TypedDict):
    """What ``jwt:verify`` returns. ``claims`` is only set when ``valid`` is true."""

    valid: bool
    claims: dict[str, Any] | None
    reason: JwtReason | None


WHY_NOT_JWT: Final = (
    "PyJWT imports 'cryptography', whose Rust extension refuses to load in an isolated "
    "subinterpreter (so even HS256 cannot run there)"
)


def jwt_sign(
    claims: Mapping[str, Any],
    key: str | bytes,
    *,
    algorithm: str = "HS256",
    expires_in: float | None = None,
    headers: Mapping[str, Any] | None = None,
) -> str:
    """Sign ``claims`` into a compact JWT.

    >>> token = jwt_sign({"sub": "42"}, "a-32-byte-or-longer-shared-secret!", expires_in=60)
    >>> token.count(".")
    2

    ``key`` is the shared secret for ``HS256``/``HS384``/``HS512`` and an unencrypted PEM
    private key for ``RS256``, ``ES256`` (P-256) and ``EdDSA`` (Ed25519/Ed448).
    ``expires_in`` (seconds from now; may be negative, e.g. to make an already expired
    token for a test) sets ``exp``, and ``iat`` if absent. ``headers`` adds header
    fields such as ``kid``; it cannot change ``alg``.
    """
    alg = _algorithm(algorithm, "algorithm")
    if not isinstance(claims, Mapping) or not all(isinstance(k, str) for k in claims):
        raise InvalidInput("claims must be a dict with string keys")
    payload = dict(claims)
    if expires_in is not None:
        if (
            isinstance(expires_in, bool)
            or not isinstance(expires_in, int | float)
            or not math.isfinite(expires_in)
        ):
            raise InvalidInput("expires_in must be a number of seconds")
        if "exp" in payload:
            raise InvalidInput("give either an 'exp' claim or expires_in, not both")
        now = int(time.time())
        payload.setdefault("iat", now)
        payload["exp"] = now + math.ceil(expires_in)
    extra: dict[str, Any] | None = None
    if headers is not None:
        if not isinstance(headers, Mapping) or not all(isinstance(k, str) for k in headers):
            raise InvalidInput("headers must be a dict with string keys")
        if headers.get("alg", alg) != alg:
            raise InvalidInput("headers cannot override 'alg'; use algorithm=")
        extra = {k: v for k, v in headers.items() if k != "alg"}
    signing_key = _signing_key(alg, key)
    jwt = _import_jwt()
    problem = ""
    with _quiet_key_length(jwt):
        try:
            return str(jwt.encode(payload, signing_key, algorithm=alg, headers=extra))
        except jwt.InvalidKeyError:
            problem = f"key cannot be used with {alg} (an HMAC secret must not be a PEM/SSH key)"
        except (TypeError, ValueError, OverflowError):
            problem = "claims and headers must be JSON-serializable"
    raise InvalidInput(problem)


def jwt_verify(
    token: str | bytes,
    key: str | bytes,
    *,
    algorithms: Sequence[str],
    audience: str | Sequence[str] | None = None,
    issuer: str | Sequence[str] | None = None,
    leeway: float = 0,
) -> JwtVerifyResult:
    """Verify ``token``; returns ``{"valid", "claims", "reason"}``, never raises for a bad token.

    >>> secret = "a-32-byte-or-longer-shared-secret!"
    >>> token = jwt_sign({"sub": "42", "aud": "api"}, secret)
    >>> jwt_verify(token, secret, algorithms=["HS256"], audience="api")["claims"]
    {'sub': '42', 'aud': 'api'}
    >>> jwt_verify(token, secret, algorithms=["HS512"])["reason"]
    'algorithm_not_allowed'

    ``algorithms`` is the required, non-empty allow-list. ``reason`` is one of
    ``"expired"``, ``"immature"`` (``nbf``/``iat`` in the future), ``"invalid_signature"``,
    ``"invalid_audience"`` (also: the token has ``aud`` but no ``audience`` was given, or the
    reverse), ``"invalid_issuer"``, ``"algorithm_not_allowed"`` or ``"malformed"``.
    ``leeway`` (seconds) applies to ``exp``, ``nbf`` and ``iat``.
    """
    allowed = _allow_list(algorithms)
    key_bytes = _key_bytes(key)
    aud = _names(audience, "audience")
    iss = _names(issuer, "issuer")
    if (
        isinstance(leeway, bool)
        or not isinstance(leeway, int | float)
        or not math.isfinite(leeway)
        or leeway < 0
    ):
        raise InvalidInput("leeway must be a number of seconds >= 0")
    if isinstance(token, bytes | bytearray):
        token = bytes(token).decode("ascii", "replace")
    if not isinstance(token, str):
        raise InvalidInput(f"token must be a str, not {type(token).__name__}")

    jwt = _import_jwt()
    public_key = _verifying_key(key_bytes) if allowed - _HMAC else None
    if not allowed & _HMAC and not any(_fits(alg, public_key) for alg in allowed):
        raise InvalidInput(
            f"key is not a PEM public key, private key or certificate for any of {sorted(allowed)}"
        )

    header: object = None
    try:
        header = jwt.get_unverified_header(token)
    except Exception:  # any parse failure of an untrusted token is just "malformed"
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        return _rejected("malformed")
    alg: str = header["alg"]
    if alg not in allowed:
        return _rejected("algorithm_not_allowed")
    verify_key: Any = key_bytes
    if alg not in _HMAC:
        if not _fits(alg, public_key):
            return _rejected("invalid_signature")
        verify_key = public_key

    reason: JwtReason = "malformed"
    with _quiet_key_length(jwt):
        try:
            claims = jwt.decode(
                token, verify_key, algorithms=[alg], audience=aud, issuer=iss, leeway=leeway
            )
        except jwt.ExpiredSignatureError:
            reason = "expired"
        except jwt.ImmatureSignatureError:
            reason = "immature"
        except jwt.InvalidAudienceError:
            reason = "invalid_audience"
        except jwt.InvalidIssuerError:
            reason = "invalid_issuer"
        except jwt.MissingRequiredClaimError as exc:
            if exc.claim == "aud":
                reason = "invalid_audience"
            elif exc.claim == "iss":
                reason = "invalid_issuer"
        except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
            reason = "invalid_signature"
        except jwt.InvalidAlgorithmError:
            reason = "algorithm_not_allowed"
        except Exception:  # DecodeError and anything else an untrusted token can provoke
            reason = "malformed"
        else:
            if isinstance(claims, dict):
                return {"valid": True, "claims": claims, "reason": None}
    return _rejected(reason)


def _rejected(reason: JwtReason) -> JwtVerifyResult:
    return {"valid": False, "claims": None, "reason": reason}


def _import_jwt() -> Any:
    with optional_import("pyjwt", "jwt", WHY_NOT_JWT):
        import jwt
    return jwt


@contextmanager
def _quiet_key_length(jwt: Any) -> Iterator[None]:
    """Silence PyJWT's ``InsecureKeyLengthWarning``: short HMAC secrets are the caller's call."""
    import warnings

    category = getattr(jwt, "InsecureKeyLengthWarning", None)
    with warnings.catch_warnings():
        if category is not None:
            warnings.simplefilter("ignore", category)
        yield


def _algorithm(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {type(value).__name__}")
    if value.lower() == "none":
        raise InvalidInput("the 'none' algorithm is never allowed")
    if value not in JWT_ALGORITHMS:
        raise InvalidInput(
            f"unsupported JWT algorithm {shown(value)}; use one of {sorted(JWT_ALGORITHMS)}"
        )
    return value


def _allow_list(algorithms: object) -> frozenset[str]:
    if isinstance(algorithms, str | bytes) or not isinstance(
        algorithms, Sequence | frozenset | set
    ):
        raise InvalidInput("algorithms must be a list of algorithm names, e.g. ['RS256']")
    if not algorithms:
        raise InvalidInput("algorithms must name at least one allowed algorithm")
    return frozenset(_algorithm(alg, "algorithms[]") for alg in algorithms)


def _names(value: object, field: str) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(item, str) for item in value):
        return list(value)
    raise InvalidInput(f"{field} must be a string or a non-empty list of strings")


def _key_bytes(key: object) -> bytes:
    raw = as_bytes(key, "key")
    if not raw:
        raise InvalidInput("key must not be empty")
    return raw


def _signing_key(alg: str, key: object) -> Any:
    raw = _key_bytes(key)
    if alg in _HMAC:
        return raw
    with optional_import("cryptography", "jwt", NEEDS_CRYPTOGRAPHY):
        from cryptography.hazmat.primitives import serialization
    loaded: Any = None
    try:
        loaded = serialization.load_pem_private_key(raw, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm: all mean "not usable"
        loaded = None
    if loaded is None:
        raise InvalidInput(f"{alg} needs an unencrypted PEM private key")
    if not _fits(alg, loaded.public_key()):
        raise InvalidInput(f"the private key's type does not match {alg}")
    return loaded


def _verifying_key(raw: bytes) -> Any:
    """A public key from PEM (public key, private key or certificate) or OpenSSH; else None."""
    with optional_import("cryptography", "jwt", NEEDS_CRYPTOGRAPHY):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    text = raw.lstrip()
    loaded: Any = None
    try:
        if b"-----BEGIN CERTIFICATE-----" in text:
            loaded = x509.load_pem_x509_certificate(text).public_key()
        elif b"PRIVATE KEY-----" in text:
            loaded = serialization.load_pem_private_key(text, password=None).public_key()
        elif text.startswith(b"-----BEGIN"):
            loaded = serialization.load_pem_public_key(text)
        elif text.startswith((b"ssh-", b"ecdsa-sha2-")):
            loaded = serialization.load_ssh_public_key(text)
    except Exception:  # not a usable key for the asymmetric algorithms
        loaded = None
    return loaded


def _fits(alg: str, public_key: Any) -> bool:
    """Whether ``public_key`` is the right kind of key for ``alg``."""
    if public_key is None or alg in _HMAC:
        return False
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if alg == "RS256":
        return isinstance(public_key, rsa.RSAPublicKey)
    if alg == "ES256":
        return isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        )
    if alg == "EdDSA":
        return isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


@task("jwt:sign", kinds=PROCESS_KINDS, why_not=WHY_NOT_JWT)
def _jwt_sign_task(data: Any) -> str:
    args = unpack(data, "jwt:sign", ("claims", "key"), ("algorithm", "expires_in", "headers"))
    return jwt_sign(
        args["claims"],
        args["key"],
        algorithm=args.get("algorithm", "HS256"),
        expires_in=args.get("expires_in"),
        headers=args.get("headers"),
    )


@task("jwt:verify", kinds=PROCESS_KINDS, why_not=WHY_NOT_JWT)
def _jwt_verify_task(data: Any) -> JwtVerifyResult:
    args = unpack(
        data, "jwt:verify", ("token", "key", "algorithms"), ("audience", "issuer", "leeway")
    )
    return jwt_verify(
        args["token"],
        args["key"],
        algorithms=args["algorithms"],
        audience=args.get("audience"),
        issuer=args.get("issuer"),
        leeway=args.get("leeway", 0),
    )
