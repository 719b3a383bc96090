"""Built-in JWT tasks (``jwt:sign``, ``jwt:verify``) on PyJWT.

HS256/384/512 run on every worker kind, interpreter workers included; RS256, ES256 and EdDSA
need ``cryptography``, whose Rust extension refuses to load in an isolated subinterpreter, so
``kinds_for`` sends those tasks to process workers. PyJWT imports ``cryptography`` when it is
installed and only copes with its absence (``ModuleNotFoundError``), not with a refusal to
load: in an interpreter where ``cryptography`` refuses, the first JWT task imports PyJWT with
``cryptography`` hidden, so PyJWT comes up HMAC-only there.

Signing refuses what verification would reject: registered claims of the wrong type
(``exp``/``nbf``/``iat`` numbers, ``iss``/``sub``/``jti`` strings, ``aud`` a string or a list
of strings), values JSON cannot carry faithfully (NaN, infinities, non-string object keys,
``bytes``, sets...), header fields verification refuses (``crit``, ``b64``, a non-string
``kid``), and keys shorter than RFC 7518 allows (an HMAC secret shorter than the hash output,
an RSA key under 2048 bits). Verification refuses such keys too, as ``InvalidInput``.

Verification is strict: the caller names the allowed algorithms, ``none`` is never accepted,
the token's algorithm must be in the allow-list and must fit the key (an RSA public key is
never used as an HMAC secret), and ``exp``/``nbf``/``iat``/``aud``/``iss`` are checked. A bad
token is an answer, ``{"valid": False, "reason": ...}``, not an exception; bad *arguments*
(no allow-list, an unknown algorithm, a key that fits none of the allowed algorithms or is too
short) are ``InvalidInput``. Keys and tokens never appear in messages.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime
import functools
import importlib
import json
import math
import sys
import threading
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

__all__ = (
    "HMAC_MIN_KEY_BYTES",
    "JWT_ALGORITHMS",
    "RSA_MIN_KEY_BITS",
    "JwtReason",
    "JwtVerifyResult",
    "jwt_sign",
    "jwt_verify",
)

#: The algorithms ``jwt:sign`` and ``jwt:verify`` support.
JWT_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA"})
_HMAC: Final = frozenset({"HS256", "HS384", "HS512"})
#: RFC 7518 section 3.2: an HMAC key at least as long as the hash output, in bytes.
HMAC_MIN_KEY_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
#: RFC 7518 section 3.3: RSA keys of 2048 bits or more.
RSA_MIN_KEY_BITS: Final = 2048
_TIME_CLAIMS: Final = ("exp", "nbf", "iat")
_STRING_CLAIMS: Final = ("iss", "sub", "jti")
_STRING_HEADERS: Final = ("kid", "typ", "cty")
_MAX_DEPTH: Final = 64  # nesting of claim values (JSON objects and arrays)

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
    "RS256, ES256 and EdDSA need 'cryptography', whose Rust extension refuses to load in an "
    "isolated subinterpreter (HS256/384/512 run there)"
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

    ``key`` is the shared secret for ``HS256``/``HS384``/``HS512`` (a ``str`` counts as its
    UTF-8 bytes; at least 32/48/64 bytes, RFC 7518 section 3.2) and an unencrypted PEM
    private key for ``RS256`` (RSA, at least 2048 bits), ``ES256`` (P-256) and ``EdDSA``
    (Ed25519/Ed448). ``expires_in`` (seconds from now; may be negative, e.g. to make an
    already expired token for a test) sets ``exp``, and ``iat`` if absent. ``headers`` adds
    header fields such as ``kid``; it cannot change ``alg`` or set ``crit``/``b64``.

    ``claims`` must be JSON that :func:`jwt_verify` accepts back unchanged: ``exp``, ``nbf``
    and ``iat`` are numbers (not ``bool``; a ``datetime`` is turned into seconds, naive
    meaning UTC), ``iss``, ``sub`` and ``jti`` are strings, ``aud`` is a non-empty string or
    a non-empty list of non-empty strings; other values are ``None``, ``bool``, ``int``,
    finite ``float``, ``str``, lists/tuples and dicts with string keys, nested at most 64
    deep. Anything else is ``InvalidInput`` (``INVALID_INPUT``) naming the claim, as is a
    bad algorithm, key or header.
    """
    alg = _algorithm(algorithm, "algorithm")
    payload = _checked_claims(claims)
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
    extra = None if headers is None else _checked_headers(headers, alg)
    signing_key = _signing_key(alg, key)
    jwt = _import_jwt()
    problem = ""
    try:
        return str(jwt.encode(payload, signing_key, algorithm=alg, headers=extra))
    except jwt.InvalidKeyError:
        problem = f"key cannot be used with {alg} (an HMAC secret must not be a PEM/SSH key)"
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

    Bad arguments are ``InvalidInput`` (``INVALID_INPUT``): an empty or unknown allow-list,
    a key that fits none of the allowed algorithms, and a key too short for one of them
    (RFC 7518): an HMAC secret shorter than the hash output (32/48/64 bytes for
    HS256/384/512) while that algorithm is allowed, an RSA key under 2048 bits while RS256
    is. Such keys are refused whatever the token, as :func:`jwt_sign` refuses them.
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

    public_key = _verifying_key(key_bytes) if allowed - _HMAC else None
    if not allowed & _HMAC and not any(_fits(alg, public_key) for alg in allowed):
        raise InvalidInput(
            f"key is not a PEM public key, private key or certificate for any of {sorted(allowed)}"
        )
    if public_key is None:
        for hmac_alg in sorted(allowed & _HMAC):
            _check_hmac_key(hmac_alg, key_bytes, "drop it from algorithms or use a longer key")
    elif "RS256" in allowed and _fits("RS256", public_key):
        _check_rsa_key(public_key)
    jwt = _import_jwt()

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


_IMPORT_LOCK: Final = threading.Lock()


def _import_jwt() -> Any:
    """PyJWT; HMAC-only where ``cryptography`` is installed but refuses to load."""
    loaded = sys.modules.get("jwt")
    if loaded is not None:
        return loaded
    with _IMPORT_LOCK, optional_import("pyjwt", "jwt", WHY_NOT_JWT):
        if _cryptography_refuses_to_load():
            with _cryptography_hidden():
                import jwt
        else:
            import jwt
    return jwt


def _cryptography_refuses_to_load() -> bool:
    """True in an isolated subinterpreter with ``cryptography`` installed (it raises a plain
    ``ImportError`` there, which PyJWT does not expect); False where it loads or is absent."""
    try:
        importlib.import_module("cryptography.hazmat.primitives.hashes")
    except ModuleNotFoundError:
        return False
    except ImportError:
        return True
    return False


@contextmanager
def _cryptography_hidden() -> Iterator[None]:
    """Make ``import cryptography...`` raise ``ModuleNotFoundError`` for a moment, as if it
    were not installed. What was loaded of it before is put back afterwards, so a later
    import still says that it refuses to load here (``UnsupportedKind``, not "install it")."""
    saved = {
        name: module
        for name, module in sys.modules.items()
        if name == "cryptography" or name.startswith("cryptography.")
    }
    for name in saved:
        del sys.modules[name]
    sys.modules["cryptography"] = None  # type: ignore[assignment]  # None: "not found"
    try:
        yield
    finally:
        if sys.modules.get("cryptography", saved) is None:
            del sys.modules["cryptography"]
        sys.modules.update(saved)


def _checked_claims(claims: object) -> dict[str, Any]:
    """``claims`` as plain JSON that verification accepts back unchanged, else InvalidInput."""
    if not isinstance(claims, Mapping) or not all(isinstance(k, str) for k in claims):
        raise InvalidInput("claims must be a dict with string keys")
    payload: dict[str, Any] = {}
    for name, value in claims.items():
        where = f"claim {_label(name)}"
        if name in _TIME_CLAIMS:
            payload[name] = _numeric_date(value, where)
        elif name in _STRING_CLAIMS:
            if not isinstance(value, str):
                raise InvalidInput(f"{where} must be a string, not {type(value).__name__}")
            payload[name] = str(value)
        elif name == "aud":
            payload[name] = _audience_claim(value, where)
        else:
            payload[name] = _json_value(value, where, 0)
        _check_serializable(payload[name], where)
    return payload


def _checked_headers(headers: object, alg: str) -> dict[str, Any]:
    if not isinstance(headers, Mapping) or not all(isinstance(k, str) for k in headers):
        raise InvalidInput("headers must be a dict with string keys")
    if headers.get("alg", alg) != alg:
        raise InvalidInput("headers cannot override 'alg'; use algorithm=")
    extra: dict[str, Any] = {}
    for name, value in headers.items():
        where = f"header {_label(name)}"
        if name in ("crit", "b64"):
            raise InvalidInput(f"{where} is not supported: jwt:verify accepts no JWS extensions")
        if name in _STRING_HEADERS and not isinstance(value, str):
            raise InvalidInput(f"{where} must be a string, not {type(value).__name__}")
        if name != "alg":
            extra[name] = _json_value(value, where, 0)
            _check_serializable(extra[name], where)
    return extra


def _label(name: str) -> str:
    """A claim or header name for a message: shown if it looks like a name, else hidden."""
    return shown(name) if name else "''"


def _numeric_date(value: object, where: str) -> int | float:
    if isinstance(value, datetime.datetime):  # as PyJWT does: naive means UTC
        seconds: int | None = None
        with contextlib.suppress(OverflowError, ValueError):  # year 1 with a UTC offset...
            seconds = calendar.timegm(value.utctimetuple())
        if seconds is None:
            raise InvalidInput(f"{where} is a datetime that has no UTC time")
        return seconds
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise InvalidInput(
            f"{where} must be a finite number of seconds since the epoch (or a datetime), "
            f"not {type(value).__name__}"
        )
    return int(value) if isinstance(value, int) else float(value)


def _audience_claim(value: object, where: str) -> str | list[str]:
    if isinstance(value, str) and value:
        return str(value)
    if (
        isinstance(value, list | tuple)
        and value
        and all(isinstance(item, str) and item for item in value)
    ):
        return [str(item) for item in value]
    raise InvalidInput(f"{where} must be a non-empty string or a non-empty list of them")


def _json_value(value: object, where: str, depth: int) -> Any:
    """``value`` as plain JSON types (tuples become lists), else InvalidInput."""
    if depth > _MAX_DEPTH:
        raise InvalidInput(f"{where} is nested more than {_MAX_DEPTH} deep")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{where} holds {value!r}, which JSON cannot represent")
        return float(value)
    if isinstance(value, list | tuple):
        return [_json_value(item, where, depth + 1) for item in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise InvalidInput(f"{where} holds an object whose keys are not all strings")
        return {k: _json_value(v, where, depth + 1) for k, v in value.items()}
    raise InvalidInput(f"{where} holds a {type(value).__name__}, which is not JSON")


def _check_serializable(value: object, where: str) -> None:
    """What type checks cannot see: an integer with more digits than Python converts."""
    problem = ""
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        problem = f"{where} holds an integer too large to write as JSON"
    if problem:
        raise InvalidInput(problem)


def _check_hmac_key(alg: str, raw: bytes, remedy: str) -> None:
    needed = HMAC_MIN_KEY_BYTES[alg]
    if len(raw) < needed:
        raise InvalidInput(
            f"the key is {len(raw)} byte{'' if len(raw) == 1 else 's'} long; {alg} needs at "
            f"least {needed} bytes (RFC 7518 section 3.2): {remedy}"
        )


def _check_rsa_key(public_key: Any) -> None:
    bits = int(public_key.key_size)
    if bits < RSA_MIN_KEY_BITS:
        raise InvalidInput(
            f"the RSA key has {bits} bits; RS256 needs at least {RSA_MIN_KEY_BITS} "
            "(RFC 7518 section 3.3)"
        )


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
        _check_hmac_key(alg, raw, "use a longer key")
        return raw
    loaded = _private_key(raw)
    if loaded is None:
        raise InvalidInput(f"{alg} needs an unencrypted PEM private key")
    if not _fits(alg, loaded.public_key()):
        raise InvalidInput(f"the private key's type does not match {alg}")
    if alg == "RS256":
        _check_rsa_key(loaded.public_key())
    return loaded


@functools.lru_cache(maxsize=16)
def _private_key(raw: bytes) -> Any:
    """A private key from unencrypted PEM, else None. Cached per worker: loading one (an RSA
    key's checks) costs about 35 ms here, over 99 % of an RS256 signature."""
    with optional_import("cryptography", "jwt", NEEDS_CRYPTOGRAPHY):
        from cryptography.hazmat.primitives import serialization
    try:
        return serialization.load_pem_private_key(raw, password=None)
    except Exception:  # ValueError, TypeError, UnsupportedAlgorithm: all mean "not usable"
        return None


@functools.lru_cache(maxsize=16)
def _verifying_key(raw: bytes) -> Any:
    """A public key from PEM (public key, private key or certificate) or OpenSSH; else None.
    Cached per worker, as ``_private_key``."""
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


def _asymmetric_needs_a_process(data: Any) -> tuple[str, ...] | None:
    """HS* run anywhere; RS256, ES256 and EdDSA need ``cryptography``, so a process.

    Malformed ``data`` keeps every kind: the task itself then says what is wrong."""
    if not isinstance(data, Mapping):
        return None
    named: object
    if "algorithms" in data:
        named = data["algorithms"]
        if isinstance(named, str | bytes) or not isinstance(named, Sequence | frozenset | set):
            return None
    else:
        named = [data.get("algorithm", "HS256")]
    if any(alg in JWT_ALGORITHMS - _HMAC for alg in named if isinstance(alg, str)):
        return PROCESS_KINDS
    return None


@task("jwt:sign", kinds_for=_asymmetric_needs_a_process, why_not=WHY_NOT_JWT)
def _jwt_sign_task(data: Any) -> str:
    args = unpack(data, "jwt:sign", ("claims", "key"), ("algorithm", "expires_in", "headers"))
    return jwt_sign(
        args["claims"],
        args["key"],
        algorithm=args.get("algorithm", "HS256"),
        expires_in=args.get("expires_in"),
        headers=args.get("headers"),
    )


@task("jwt:verify", kinds_for=_asymmetric_needs_a_process, why_not=WHY_NOT_JWT)
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
