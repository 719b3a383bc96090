"""jwt:sign refuses what jwt:verify would reject: claims, headers and keys.

A token ``jwt_sign`` returns must come back ``valid`` from ``jwt_verify`` given the right key,
algorithm, audience and issuer. Claims verification would call malformed (a numeric ``sub``,
a ``bool`` ``exp``, NaN...) and keys RFC 7518 forbids (short HMAC secrets, small RSA keys)
are ``InvalidInput`` at signing time, naming the claim and never showing the key.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import offload.tasks as t
from offload import InvalidInput
from offload._registry import registered

SECRET = "k" * 64  # long enough for every HS* algorithm
NOW = time.time()
HOUR = 3600
HOUR_AHEAD = datetime.timedelta(hours=1)


def verify(token: str, key: str | bytes = SECRET, **options: Any) -> t.JwtVerifyResult:
    options.setdefault("algorithms", ["HS256"])
    return t.jwt_verify(token, key, **options)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hs256(payload: dict[str, Any], secret: bytes) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(payload).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


# --- A.1: the reported case and its kind ------------------------------------------------------


def test_a_numeric_sub_is_refused_at_signing() -> None:
    """The report: ``{"sub": 42}`` was signed, then verify said "malformed"."""
    with pytest.raises(InvalidInput, match="'sub'") as info:
        t.jwt_sign({"sub": 42}, SECRET)
    assert info.value.code == "INVALID_INPUT"
    # What verification makes of such a token (built by hand): it is rejected.
    assert verify(hs256({"sub": 42}, SECRET.encode()))["reason"] == "malformed"
    # The string form is fine.
    assert verify(t.jwt_sign({"sub": "42"}, SECRET))["claims"] == {"sub": "42"}


@pytest.mark.parametrize(
    ("claims", "named"),
    [
        ({"sub": 42}, "sub"),
        ({"jti": 7}, "jti"),
        ({"iss": 1}, "iss"),
        ({"sub": None}, "sub"),
        ({"jti": ["a"]}, "jti"),
        ({"iss": None}, "iss"),
        ({"exp": True}, "exp"),
        ({"nbf": False}, "nbf"),
        ({"iat": True}, "iat"),
        ({"exp": "9999999999"}, "exp"),
        ({"exp": None}, "exp"),
        ({"nbf": [1]}, "nbf"),
        ({"iat": {"t": 1}}, "iat"),
        ({"exp": math.nan}, "exp"),
        ({"exp": math.inf}, "exp"),
        ({"nbf": -math.inf}, "nbf"),
        ({"aud": 5}, "aud"),
        ({"aud": None}, "aud"),
        ({"aud": ""}, "aud"),
        ({"aud": []}, "aud"),
        ({"aud": ["api", 1]}, "aud"),
        ({"aud": ["api", ""]}, "aud"),
        ({"aud": {"api": 1}}, "aud"),
        ({"roles": math.nan}, "roles"),
        ({"score": math.inf}, "score"),
        ({"blob": b"bytes"}, "blob"),
        ({"tags": {"a", "b"}}, "tags"),
        ({"when": datetime.datetime(2030, 1, 1)}, "when"),
        ({"obj": object()}, "obj"),
        ({"map": {1: "int key"}}, "map"),
        ({"map": {"ok": {None: 1}}}, "map"),
        ({"deep": [[[{"x": math.nan}]]]}, "deep"),
        ({"big": 10**5000}, "big"),
        ({"exp": 10**5000}, "exp"),
        ({"exp": datetime.datetime(1, 1, 1, tzinfo=datetime.timezone(HOUR_AHEAD))}, "exp"),
    ],
)
def test_sign_refuses_claims_verify_would_reject_or_change(
    claims: dict[str, Any], named: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        t.jwt_sign(claims, SECRET)
    assert info.value.code == "INVALID_INPUT"
    assert repr(named) in str(info.value)


def test_registered_claims_of_the_right_type_are_signed_and_verified() -> None:
    claims = {
        "iss": "https://idp",
        "sub": "",
        "jti": str(uuid.uuid4()),
        "aud": ["api", "web"],
        "exp": NOW + HOUR,  # a float is a NumericDate too
        "nbf": int(NOW) - 10,
        "iat": int(NOW) - 10,
    }
    token = t.jwt_sign(claims, SECRET)
    result = verify(token, audience="web", issuer="https://idp")
    assert result == {"valid": True, "claims": claims, "reason": None}


def test_datetimes_become_numeric_dates_like_pyjwt_does() -> None:
    exp = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    naive_iat = datetime.datetime(2020, 1, 1)  # naive means UTC
    token = t.jwt_sign({"exp": exp, "iat": naive_iat}, SECRET)
    claims = verify(token)["claims"]
    assert claims == {"exp": int(exp.timestamp()), "iat": 1577836800}


def test_tuples_are_json_arrays() -> None:
    token = t.jwt_sign({"aud": ("a", "b"), "pair": (1, (2, 3))}, SECRET)
    assert verify(token, audience="b")["claims"] == {"aud": ["a", "b"], "pair": [1, [2, 3]]}


def test_nesting_is_bounded() -> None:
    deep: Any = "leaf"
    for _ in range(64):
        deep = [deep]
    assert verify(t.jwt_sign({"deep": deep}, SECRET))["claims"] == {"deep": deep}
    with pytest.raises(InvalidInput, match=r"'deep'.*nested"):
        t.jwt_sign({"deep": [deep]}, SECRET)


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        ({"kid": 5}, "'kid'.*string"),
        ({"typ": 1}, "'typ'.*string"),
        ({"cty": None}, "'cty'.*string"),
        ({"crit": ["exp"]}, "'crit'"),
        ({"b64": False}, "'b64'"),
        ({"x": math.nan}, "'x'"),
        ({"x": b"raw"}, "'x'"),
        ({"alg": None}, "alg"),
    ],
)
def test_sign_refuses_headers_verify_would_reject(headers: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        t.jwt_sign({"sub": "1"}, SECRET, headers=headers)


def test_accepted_headers_survive_verification() -> None:
    token = t.jwt_sign({"sub": "1"}, SECRET, headers={"kid": "k1", "typ": "at+jwt", "x5t": "a"})
    assert verify(token)["valid"] is True


def test_claim_errors_name_the_claim_but_never_show_values() -> None:
    marker = "S3CRET" + uuid.uuid4().hex
    for claims in ({"sub": [marker]}, {marker: {1: marker}}, {"aud": [marker, 3]}):
        with pytest.raises(InvalidInput) as info:
            t.jwt_sign(claims, SECRET)
        assert marker not in str(info.value)
        assert marker not in repr(info.value)


# --- the property ---------------------------------------------------------------------------

names = st.from_regex(r"[a-z_]{1,8}", fullmatch=True).filter(
    lambda n: n not in {"exp", "nbf", "iat", "aud", "iss", "sub", "jti"}
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
future = st.integers(int(NOW) + HOUR, 2**62) | st.floats(NOW + HOUR, 1e300)
past = st.integers(-(2**62), int(NOW) - 10) | st.floats(-1e300, NOW - 10)
audiences = st.text(min_size=1, max_size=8) | st.lists(
    st.text(min_size=1, max_size=8), min_size=1, max_size=3
)


@st.composite
def good_claims(draw: st.DrawFn) -> dict[str, Any]:
    """Claims of the right types: sign must accept every one of these."""
    claims: dict[str, Any] = draw(st.dictionaries(names, json_values, max_size=4))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "exp": future,
        "nbf": past,
        "iat": past,
        "aud": audiences,
        "iss": st.text(max_size=10),
        "sub": st.text(max_size=10),
        "jti": st.text(max_size=10),
    }
    for name, values in optional.items():
        if draw(st.booleans()):
            claims[name] = draw(values)
    return claims


junk = (
    st.none()
    | st.booleans()
    | st.sampled_from([math.nan, math.inf, -math.inf, b"x", 10**5000, "", (), [], {}])
    | st.text(max_size=5)
    | st.integers(-(2**63), 2**63)
    | st.lists(st.integers() | st.text(max_size=3), max_size=2)
    | st.dictionaries(st.integers() | st.text(max_size=3), st.integers(), max_size=2)
    | st.builds(set, st.lists(st.integers(), max_size=2))
)


@st.composite
def any_claims(draw: st.DrawFn) -> dict[str, Any]:
    """Good claims with some values swapped for anything at all."""
    claims = draw(good_claims())
    for name in draw(
        st.lists(
            st.sampled_from(["exp", "nbf", "iat", "aud", "iss", "sub", "jti", "x"]), max_size=3
        )
    ):
        value = draw(junk)
        is_number = type(value) is int or (type(value) is float and math.isfinite(value))
        if name in ("exp", "nbf", "iat") and is_number and value != 10**5000:
            value = draw(future if name == "exp" else past)  # a number: its time must be right
        claims[name] = value
    return claims


@functools.cache
def key_pair(alg: str) -> tuple[str | bytes, str | bytes]:
    """(signing key, verifying key) for ``alg``, made once per test run."""
    if alg.startswith("HS"):
        secret = bytes(range(t.HMAC_MIN_KEY_BYTES[alg]))
        return secret, secret
    private: Any = {
        "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
    }[alg]()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, public


def sign_then_verify(claims: dict[str, Any], alg: str) -> t.JwtVerifyResult | None:
    """Sign, then verify as the token's audience and with its issuer; None if sign refused."""
    private, public = key_pair(alg)
    try:
        token = t.jwt_sign(claims, private, algorithm=alg)
    except InvalidInput as exc:
        code = exc.code
    else:
        aud = claims.get("aud")
        return t.jwt_verify(
            token,
            public,
            algorithms=[alg],
            audience=aud if not isinstance(aud, list | tuple) else aud[-1],
            issuer=claims.get("iss"),
        )
    assert code == "INVALID_INPUT"
    return None


algorithms = st.sampled_from(sorted(t.JWT_ALGORITHMS))
prop = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@prop
@given(claims=good_claims(), alg=algorithms)
@example(claims={"sub": "42"}, alg="HS256")
@example(claims={"aud": ["a", "b"], "iss": "", "exp": 2**62}, alg="HS512")
def test_well_typed_claims_are_signed_and_verified_unchanged(
    claims: dict[str, Any], alg: str
) -> None:
    result = sign_then_verify(claims, alg)
    assert result == {"valid": True, "claims": claims, "reason": None}


@prop
@given(claims=any_claims(), alg=algorithms)
@example(claims={"sub": 42}, alg="HS256")
@example(claims={"exp": True}, alg="HS256")
@example(claims={"jti": 1.5, "x": math.nan}, alg="ES256")
def test_whatever_sign_accepts_verify_accepts(claims: dict[str, Any], alg: str) -> None:
    """The property of the report: sign refuses, or verify says valid with the same claims
    (as JSON: tuples come back as lists)."""
    result = sign_then_verify(claims, alg)
    if result is not None:
        assert result == {
            "valid": True,
            "claims": json.loads(json.dumps(claims)),
            "reason": None,
        }


# --- A.2: key lengths (RFC 7518) --------------------------------------------------------------


def test_a_one_byte_hs256_key_is_refused() -> None:
    """The report: a 1-byte HS256 key was accepted silently."""
    with pytest.raises(InvalidInput, match=r"HS256 needs at least 32 bytes") as info:
        t.jwt_sign({"sub": "1"}, "k")
    assert info.value.code == "INVALID_INPUT"


@pytest.mark.parametrize(("alg", "needed"), [("HS256", 32), ("HS384", 48), ("HS512", 64)])
def test_hmac_keys_shorter_than_the_hash_are_refused_by_sign_and_verify(
    alg: str, needed: int
) -> None:
    assert t.HMAC_MIN_KEY_BYTES[alg] == needed
    for short in (b"x", b"x" * (needed - 1), "\u00e9" * ((needed - 1) // 2)):  # str: UTF-8 bytes
        with pytest.raises(InvalidInput, match=f"{alg} needs at least {needed} bytes"):
            t.jwt_sign({"sub": "1"}, short, algorithm=alg)
        with pytest.raises(InvalidInput, match=f"{alg} needs at least {needed} bytes"):
            t.jwt_verify("a.b.c", short, algorithms=[alg])
    exact = b"x" * needed
    token = t.jwt_sign({"sub": "1"}, exact, algorithm=alg)
    assert t.jwt_verify(token, exact, algorithms=[alg])["valid"] is True
    assert t.jwt_verify(token, "\u00e9" * (needed // 2), algorithms=[alg])["reason"] == (
        "invalid_signature"
    )


def test_verify_refuses_a_key_too_short_for_any_allowed_hmac_algorithm() -> None:
    key = b"k" * 40  # enough for HS256, not for HS384/HS512
    token = t.jwt_sign({"sub": "1"}, key, algorithm="HS256")
    assert t.jwt_verify(token, key, algorithms=["HS256"])["valid"] is True
    with pytest.raises(InvalidInput, match=r"HS512 needs at least 64 bytes.*algorithms"):
        t.jwt_verify(token, key, algorithms=["HS256", "HS512"])
    # Refused whatever the token: it is the verifier's configuration that is wrong.
    with pytest.raises(InvalidInput, match="HS384"):
        t.jwt_verify("not even a token", key, algorithms=["HS384"])


def test_short_key_messages_never_contain_the_key() -> None:
    marker = "S3CRET" + uuid.uuid4().hex[:8]  # 14 bytes: short for every HS* algorithm
    for alg in ("HS256", "HS384", "HS512"):
        calls: list[Callable[[], object]] = [
            lambda alg=alg: t.jwt_sign({"sub": "1"}, marker, algorithm=alg),
            lambda alg=alg: t.jwt_verify("a.b.c", marker, algorithms=[alg]),
            lambda alg=alg: registered("jwt:sign").fn(
                {"claims": {}, "key": marker, "algorithm": alg}
            ),
        ]
        for call in calls:
            with pytest.raises(InvalidInput) as info:
                call()
            for text in (str(info.value), repr(info.value)):
                assert marker not in text
                assert marker.encode().hex() not in text
            assert info.value.__cause__ is None
            assert info.value.__context__ is None


@functools.cache
def small_rsa() -> tuple[bytes, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, public


def test_rsa_keys_under_2048_bits_are_refused_by_sign_and_verify() -> None:
    pem, public = small_rsa()
    with pytest.raises(InvalidInput, match="1024 bits; RS256 needs at least 2048"):
        t.jwt_sign({"sub": "1"}, pem, algorithm="RS256")
    with pytest.raises(InvalidInput, match="2048"):
        t.jwt_verify("a.b.c", public, algorithms=["RS256"])
