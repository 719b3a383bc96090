"""Built-in tasks, called directly: the registry, JWT signing and verification, no leaks.

The other built-ins are in test_builtins_crypto.py, test_builtins_compress.py and
test_builtins_json.py; runs through real workers are in test_builtins_workers.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
import textwrap
import time
import traceback
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import offload.tasks as t
from offload import InvalidInput, OffloadError
from offload._registry import registered

# --- keys ---------------------------------------------------------------------------------


def _pem_pair(private: Any) -> tuple[str, str]:
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, str]]:
    """(private PEM, public PEM) per algorithm family; HS* use a shared secret."""
    secret = "k" * 64
    return {
        "HS256": (secret, secret),
        "HS384": (secret, secret),
        "HS512": (secret, secret),
        "RS256": _pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ES256": _pem_pair(ec.generate_private_key(ec.SECP256R1())),
        "EdDSA": _pem_pair(ed25519.Ed25519PrivateKey.generate()),
    }


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_json(value: object) -> str:
    return b64url(json.dumps(value).encode())


def hs256_token(header: object, payload: object, secret: bytes) -> str:
    """A hand-made HS256 token, for headers and payloads PyJWT would not produce."""
    head = b64url_json(header) if not isinstance(header, str) else b64url(header.encode())
    body = b64url_json(payload) if not isinstance(payload, str) else b64url(payload.encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def verify(token: str, key: str | bytes, **options: Any) -> t.JwtVerifyResult:
    options.setdefault("algorithms", ["HS256"])
    return t.jwt_verify(token, key, **options)


def rejected(result: t.JwtVerifyResult) -> str | None:
    assert result["valid"] is False
    assert result["claims"] is None
    return result["reason"]


# --- registry -----------------------------------------------------------------------------

ALL = {"process", "interpreter", "dask"}
PROCESS_ONLY = {"process", "dask"}
ZSTD_KINDS = ALL if t.STDLIB_ZSTD else PROCESS_ONLY  # compression.zstd: Python 3.14+
EXPECTED_KINDS = {
    "jwt:sign": ALL,  # RS256, ES256, EdDSA: narrowed to PROCESS_ONLY per task
    "jwt:verify": ALL,
    "crypto:hash": ALL,
    "crypto:hash_password": ALL,
    "crypto:verify_password": ALL,
    "crypto:encrypt": PROCESS_ONLY,
    "crypto:decrypt": PROCESS_ONLY,
    "compress:zstd": ZSTD_KINDS,
    "decompress:zstd": ZSTD_KINDS,
    "compress:gzip": ALL,
    "decompress:gzip": ALL,
    "json:transform": ALL,
}


@pytest.mark.parametrize(("name", "kinds"), sorted(EXPECTED_KINDS.items()))
def test_every_builtin_is_registered_with_its_kinds(name: str, kinds: set[str]) -> None:
    entry = registered(name)
    assert entry.kinds == kinds
    assert entry.fn.__module__.startswith("offload.tasks.")
    if kinds != ALL:
        assert "subinterpreter" in entry.why_not


@pytest.mark.parametrize(
    ("name", "data", "kinds"),
    [
        ("jwt:sign", {"claims": {}, "key": "k" * 32}, ALL),
        ("jwt:sign", {"claims": {}, "key": "k" * 64, "algorithm": "HS512"}, ALL),
        ("jwt:sign", {"claims": {}, "key": "pem", "algorithm": "RS256"}, PROCESS_ONLY),
        ("jwt:sign", {"claims": {}, "key": "pem", "algorithm": "ES256"}, PROCESS_ONLY),
        ("jwt:sign", {"claims": {}, "key": "pem", "algorithm": "EdDSA"}, PROCESS_ONLY),
        ("jwt:verify", {"token": "t", "key": "k", "algorithms": ["HS256", "HS384"]}, ALL),
        ("jwt:verify", {"token": "t", "key": "k", "algorithms": ["HS256", "EdDSA"]}, PROCESS_ONLY),
        ("jwt:verify", {"token": "t", "key": "k", "algorithms": ("RS256",)}, PROCESS_ONLY),
        # Malformed data keeps every kind: the task itself says what is wrong, anywhere.
        ("jwt:sign", {"claims": {}, "key": "k", "algorithm": 256}, ALL),
        ("jwt:verify", {"token": "t", "key": "k", "algorithms": "RS256"}, ALL),
        ("jwt:verify", ["not", "a", "dict"], ALL),
    ],
)
def test_jwt_routes_by_algorithm(name: str, data: Any, kinds: set[str]) -> None:
    assert registered(name).kinds_of(data) == kinds


def test_importing_the_tasks_does_not_import_heavy_dependencies() -> None:
    code = textwrap.dedent(
        """
        import sys, offload.tasks, offload.builtins
        heavy = ("jwt", "cryptography", "zstandard", "compression.zstd", "_zstd")
        heavy = [m for m in heavy if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_dict_task_data_is_checked() -> None:
    sign = registered("jwt:sign").fn
    with pytest.raises(InvalidInput, match="must be a dict"):
        sign(["claims"])
    with pytest.raises(InvalidInput, match="missing"):
        sign({"claims": {}})
    with pytest.raises(InvalidInput, match="unknown data keys"):
        sign({"claims": {}, "key": "k" * 32, "algorithm": "HS256", "algorthm": "x"})


# --- jwt: RFC 7515 appendix A.1 -----------------------------------------------------------

RFC7515_KEY = base64.urlsafe_b64decode(
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow=="
)
RFC7515_TOKEN = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)
RFC7515_EXP = 1300819380


def test_rfc7515_a1_token_verifies_with_the_rfc_key() -> None:
    # Its exp is in 2011: with a leeway reaching back past it, the signature and claims check.
    leeway = time.time() - RFC7515_EXP + 3600
    result = verify(RFC7515_TOKEN, RFC7515_KEY, leeway=leeway, issuer="joe")
    assert result == {
        "valid": True,
        "claims": {"iss": "joe", "exp": RFC7515_EXP, "http://example.com/is_root": True},
        "reason": None,
    }
    # Without the leeway it is expired (PyJWT checks the signature before the claims).
    assert rejected(verify(RFC7515_TOKEN, RFC7515_KEY)) == "expired"


def test_rfc7515_a1_token_fails_with_another_key_or_a_changed_payload() -> None:
    leeway = time.time() - RFC7515_EXP + 3600
    other_key = bytes(64)
    assert rejected(verify(RFC7515_TOKEN, other_key, leeway=leeway)) == "invalid_signature"
    head, _, signature = RFC7515_TOKEN.split(".")
    forged = f"{head}.{b64url_json({'iss': 'joe', 'exp': RFC7515_EXP, 'admin': 1})}.{signature}"
    assert rejected(verify(forged, RFC7515_KEY, leeway=leeway)) == "invalid_signature"


# --- jwt: round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(t.JWT_ALGORITHMS))
def test_sign_then_verify_every_algorithm(alg: str, keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys[alg]
    token = t.jwt_sign({"sub": "42", "roles": ["a"]}, private, algorithm=alg, expires_in=60)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == alg
    result = t.jwt_verify(token, public, algorithms=[alg])
    assert result["valid"] is True
    assert result["reason"] is None
    claims = result["claims"]
    assert claims is not None
    assert claims["sub"] == "42"
    assert claims["roles"] == ["a"]
    assert claims["exp"] - claims["iat"] == 60
    assert abs(claims["iat"] - time.time()) < 5


def test_verify_accepts_the_private_key_pem_and_ed448(keys: dict[str, tuple[str, str]]) -> None:
    private, _ = keys["RS256"]
    token = t.jwt_sign({"sub": "1"}, private, algorithm="RS256")
    assert t.jwt_verify(token, private, algorithms=["RS256"])["valid"] is True
    private448, public448 = _pem_pair(ed448.Ed448PrivateKey.generate())
    token = t.jwt_sign({"sub": "1"}, private448, algorithm="EdDSA")
    assert t.jwt_verify(token, public448, algorithms=["EdDSA"])["valid"] is True


def test_sign_headers_and_bytes_keys() -> None:
    token = t.jwt_sign({"a": 1}, b"s" * 32, headers={"kid": "key-1", "alg": "HS256"})
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "HS256", "kid": "key-1", "typ": "JWT"}
    assert verify(token, "s" * 32)["claims"] == {"a": 1}


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_secrets_of_the_minimum_length_work_without_warnings(alg: str) -> None:
    # RFC 7518 wants a secret as long as the hash: shorter ones are refused (see
    # test_builtins_jwt_claims.py), so PyJWT has nothing to warn about (warnings are errors).
    secret = "s" * t.HMAC_MIN_KEY_BYTES[alg]
    token = t.jwt_sign({"a": 1}, secret, algorithm=alg)
    assert verify(token, secret, algorithms=[alg])["valid"] is True


def test_dict_tasks_sign_and_verify(keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys["ES256"]
    token = registered("jwt:sign").fn(
        {"claims": {"sub": "x"}, "key": private, "algorithm": "ES256", "expires_in": 30}
    )
    result = registered("jwt:verify").fn(
        {"token": token, "key": public, "algorithms": ["ES256"], "leeway": 1}
    )
    assert result["valid"] is True
    with pytest.raises(InvalidInput, match="algorithms"):
        registered("jwt:verify").fn({"token": token, "key": public})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    claims=st.dictionaries(
        st.text(max_size=10).filter(
            lambda k: k not in {"exp", "nbf", "iat", "aud", "iss", "sub", "jti"}
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=10,
        ),
        max_size=5,
    ),
    secret=st.binary(min_size=64, max_size=120).filter(lambda b: b"-----" not in b),
    alg=st.sampled_from(["HS256", "HS384", "HS512"]),
)
def test_sign_verify_round_trip_property(claims: dict[str, Any], secret: bytes, alg: str) -> None:
    if secret.startswith((b"ssh-", b"ecdsa-sha2-")):
        return
    token = t.jwt_sign(claims, secret, algorithm=alg)
    result = t.jwt_verify(token, secret, algorithms=[alg])
    assert result == {"valid": True, "claims": claims, "reason": None}
    assert rejected(t.jwt_verify(token, secret + b"x", algorithms=[alg])) == "invalid_signature"


# --- jwt: rejections ----------------------------------------------------------------------


def test_alg_none_is_never_accepted() -> None:
    unsigned = f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json({'sub': 'admin'})}."
    for algorithms in (["HS256"], ["HS256", "RS256"]):
        assert rejected(verify(unsigned, "k" * 32, algorithms=algorithms)) == (
            "algorithm_not_allowed"
        )
    for spelling in ("none", "None", "NONE"):
        with pytest.raises(InvalidInput, match="none"):
            verify(unsigned, "k" * 32, algorithms=[spelling])
        with pytest.raises(InvalidInput, match="none"):
            t.jwt_sign({"a": 1}, "k" * 32, algorithm=spelling)
    other_case = f"{b64url_json({'alg': 'None'})}.{b64url_json({'sub': 'admin'})}."
    assert rejected(verify(other_case, "k" * 32)) == "algorithm_not_allowed"


def test_hs256_token_signed_with_the_rsa_public_key_is_rejected(
    keys: dict[str, tuple[str, str]],
) -> None:
    """The classic confusion attack: the attacker HMACs with the server's public key."""
    _, public = keys["RS256"]
    forged = hs256_token({"alg": "HS256", "typ": "JWT"}, {"sub": "admin"}, public.encode())
    # The server only allows RS256: the HS256 token is refused on its algorithm.
    assert rejected(t.jwt_verify(forged, public, algorithms=["RS256"])) == "algorithm_not_allowed"
    # Even if HS256 is allowed too, the PEM key is never used as an HMAC secret.
    for algorithms in (["RS256", "HS256"], ["HS256"]):
        reason = rejected(t.jwt_verify(forged, public, algorithms=algorithms))
        assert reason in {"invalid_signature", "algorithm_not_allowed"}
    # PyJWT refuses a PEM as an HMAC secret for signing as well.
    with pytest.raises(InvalidInput, match="HMAC"):
        t.jwt_sign({"sub": "admin"}, public, algorithm="HS256")


def test_a_token_whose_algorithm_does_not_fit_the_key_is_invalid(
    keys: dict[str, tuple[str, str]],
) -> None:
    es_private, _ = keys["ES256"]
    _, rs_public = keys["RS256"]
    token = t.jwt_sign({"sub": "1"}, es_private, algorithm="ES256")
    reason = rejected(t.jwt_verify(token, rs_public, algorithms=["RS256", "ES256"]))
    assert reason == "invalid_signature"
    # An RS256 token presented to an HS256-only verifier.
    rs_token = t.jwt_sign({"sub": "1"}, keys["RS256"][0], algorithm="RS256")
    assert rejected(verify(rs_token, "k" * 32)) == "algorithm_not_allowed"


def test_expired_and_leeway() -> None:
    now = int(time.time())
    for token in (
        t.jwt_sign({"exp": now - 30}, "k" * 32),
        t.jwt_sign({}, "k" * 32, expires_in=-30),
    ):
        assert rejected(verify(token, "k" * 32)) == "expired"
        assert verify(token, "k" * 32, leeway=60)["valid"] is True


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_immature_and_leeway(claim: str) -> None:
    token = t.jwt_sign({claim: int(time.time()) + 60}, "k" * 32)
    assert rejected(verify(token, "k" * 32)) == "immature"
    assert verify(token, "k" * 32, leeway=120)["valid"] is True


def test_audience() -> None:
    token = t.jwt_sign({"aud": "api"}, "k" * 32)
    assert verify(token, "k" * 32, audience="api")["valid"] is True
    assert verify(token, "k" * 32, audience=["web", "api"])["valid"] is True
    assert rejected(verify(token, "k" * 32, audience="web")) == "invalid_audience"
    # A token meant for someone must not be accepted by a verifier that names no audience.
    assert rejected(verify(token, "k" * 32)) == "invalid_audience"
    no_aud = t.jwt_sign({"sub": "1"}, "k" * 32)
    assert rejected(verify(no_aud, "k" * 32, audience="api")) == "invalid_audience"


def test_issuer() -> None:
    token = t.jwt_sign({"iss": "https://idp"}, "k" * 32)
    assert verify(token, "k" * 32, issuer="https://idp")["valid"] is True
    assert rejected(verify(token, "k" * 32, issuer="https://evil")) == "invalid_issuer"
    no_iss = t.jwt_sign({"sub": "1"}, "k" * 32)
    assert rejected(verify(no_iss, "k" * 32, issuer="https://idp")) == "invalid_issuer"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "....",
        "eyJhbGciOiJIUzI1NiJ9",
        "!!!.???.***",
        b64url(b"not json") + ".e30.",
        b64url_json(["alg", "HS256"]) + ".e30.",
        b64url_json({"typ": "JWT"}) + ".e30.",  # no alg
        b64url_json({"alg": 256}) + ".e30.",
        "\u00e9\u00e9.\u00e9.\u00e9",
    ],
)
def test_malformed_tokens(token: str) -> None:
    assert rejected(verify(token, "k" * 32)) == "malformed"


@pytest.mark.parametrize(
    "payload",
    ["not json", '["a", "list"]', json.dumps({"exp": "tomorrow"}), json.dumps({"iat": "x"})],
)
def test_correctly_signed_but_malformed_payloads(payload: str) -> None:
    token = hs256_token({"alg": "HS256"}, payload, b"k" * 32)
    assert rejected(verify(token, "k" * 32)) == "malformed"


def test_tampered_signature_and_bytes_token() -> None:
    token = t.jwt_sign({"sub": "1"}, "k" * 32)
    head, body, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert rejected(verify(f"{head}.{body}.{flipped}", "k" * 32)) == "invalid_signature"
    assert rejected(verify(f"{head}.{body}.", "k" * 32)) == "invalid_signature"
    assert t.jwt_verify(token.encode(), "k" * 32, algorithms=["HS256"])["valid"] is True


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"algorithms": []}, "at least one"),
        ({"algorithms": "HS256"}, "list"),
        ({"algorithms": None}, "list"),
        ({"algorithms": ["HS256", "PS256"]}, "unsupported"),
        ({"algorithms": ["hs256"]}, "unsupported"),
        ({"leeway": -1}, "leeway"),
        ({"leeway": float("nan")}, "leeway"),
        ({"audience": 3}, "audience"),
        ({"issuer": []}, "issuer"),
    ],
)
def test_verify_rejects_bad_arguments(options: dict[str, Any], match: str) -> None:
    token = t.jwt_sign({"a": 1}, "k" * 32)
    with pytest.raises(InvalidInput, match=match) as info:
        verify(token, "k" * 32, **options)
    assert info.value.code == "INVALID_INPUT"


def test_verify_rejects_bad_keys_and_tokens(keys: dict[str, tuple[str, str]]) -> None:
    token = t.jwt_sign({"a": 1}, "k" * 32)
    with pytest.raises(InvalidInput, match="key"):
        verify(token, "", algorithms=["HS256"])
    with pytest.raises(InvalidInput, match="key"):
        verify(token, 12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="PEM"):
        verify(token, "k" * 32, algorithms=["RS256"])
    with pytest.raises(InvalidInput, match="PEM"):  # an EC key fits none of RS256, EdDSA
        verify(token, keys["ES256"][1], algorithms=["RS256", "EdDSA"])
    with pytest.raises(InvalidInput, match="token"):
        verify(None, "k" * 32)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"algorithm": "HS1"}, "unsupported"),
        ({"algorithm": "PS256"}, "unsupported"),
        ({"algorithm": None}, "algorithm"),
        ({"algorithm": "RS256"}, "PEM private key"),
        ({"expires_in": float("inf")}, "expires_in"),
        ({"expires_in": "60"}, "expires_in"),
        ({"expires_in": True}, "expires_in"),
        ({"headers": {"alg": "none"}}, "alg"),
        ({"headers": "kid"}, "headers"),
    ],
)
def test_sign_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        t.jwt_sign({"a": 1}, "k" * 32, **kwargs)


def test_sign_rejects_bad_claims_and_mismatched_keys(keys: dict[str, tuple[str, str]]) -> None:
    with pytest.raises(InvalidInput, match="JSON"):
        t.jwt_sign({"a": object()}, "k" * 32)
    with pytest.raises(InvalidInput, match="claims"):
        t.jwt_sign(["a"], "k" * 32)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="not both"):
        t.jwt_sign({"exp": 1}, "k" * 32, expires_in=10)
    with pytest.raises(InvalidInput, match="does not match"):
        t.jwt_sign({"a": 1}, keys["ES256"][0], algorithm="RS256")
    with pytest.raises(InvalidInput, match="private key"):
        t.jwt_sign({"a": 1}, keys["RS256"][1], algorithm="RS256")  # a public key
    p384 = _pem_pair(ec.generate_private_key(ec.SECP384R1()))[0]
    with pytest.raises(InvalidInput, match="does not match"):
        t.jwt_sign({"a": 1}, p384, algorithm="ES256")


# --- secrets never leak -------------------------------------------------------------------


def _marker() -> str:
    return "S3CRET" + uuid.uuid4().hex


def assert_no_leak(exc: BaseException, *secrets: str | bytes) -> None:
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for secret in secrets:
        needles = [secret] if isinstance(secret, str) else [secret.hex(), repr(secret)]
        for needle in needles:
            assert all(needle not in text for text in texts), needle
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


def test_jwt_errors_never_contain_keys_or_tokens() -> None:
    marker = _marker()
    fake_pem = f"-----BEGIN PRIVATE KEY-----\n{marker}\n-----END PRIVATE KEY-----\n"
    cases: list[Callable[[], object]] = [
        lambda: t.jwt_sign({"a": 1}, fake_pem, algorithm="RS256"),
        lambda: t.jwt_sign({"a": 1}, marker, algorithm="ES256"),
        lambda: t.jwt_sign({"a": 1}, fake_pem, algorithm="HS256"),
        lambda: t.jwt_sign({"a": 1}, marker, algorithm=marker),
        lambda: t.jwt_verify("a.b.c", fake_pem, algorithms=["RS256"]),
        lambda: t.jwt_verify(marker, marker, algorithms=[marker]),
        lambda: t.jwt_verify(marker, marker, algorithms=["HS256"], leeway=-1),
        lambda: registered("jwt:verify").fn({"token": marker, "key": marker}),
    ]
    for case in cases:
        with pytest.raises(OffloadError) as info:
            case()
        assert_no_leak(info.value, marker)
    # A rejected token is a result, and it does not echo the token either.
    result = t.jwt_verify(f"{marker}.{marker}.{marker}", marker, algorithms=["HS256"])
    assert marker not in repr(result)


# --- declared kinds match what loads in a subinterpreter ------------------------------------

SUBINTERPRETER_PROBE = """
import gzip, json
import offload.tasks
from offload import UnsupportedKind
from offload._registry import registered

# In this order on purpose: HS256 first (PyJWT is imported with cryptography hidden), then
# what needs cryptography, which must still say it cannot load here (not "install it").
samples = [
    ("jwt:sign", {"claims": {"sub": "1"}, "key": "k" * 32}),
    ("jwt:verify", {"token": "a.b.c", "key": "k" * 64, "algorithms": ["HS256", "HS512"]}),
    ("crypto:encrypt", {"plaintext": b"x", "key": bytes(32)}),
    ("crypto:hash_password", {"password": "pw", "scheme": "argon2id"}),
    ("jwt:sign", {"claims": {}, "key": "k" * 32, "algorithm": "RS256"}),
    ("jwt:sign", {"claims": {}, "key": "k" * 32, "algorithm": "EdDSA"}),
    ("jwt:verify", {"token": "a.b.c", "key": "k" * 32, "algorithms": ["HS256", "ES256"]}),
    ("crypto:hash", {"data": "abc"}),
    ("crypto:hash_password", {"password": "pw", "n": 16}),
    ("crypto:verify_password", {"password": "pw", "hash": STORED}),
    ("crypto:decrypt", {"ciphertext": b"OFE\\x01" + bytes(40), "key": bytes(32)}),
    ("compress:zstd", {"data": b"x"}),
    ("decompress:zstd", {"data": FRAME}),
    ("compress:gzip", {"data": b"x"}),
    ("decompress:gzip", {"data": gzip.compress(b"x")}),
    ("json:transform", {"document": "[1]", "transformer": "identity"}),
]
outcomes = []
for name, data in samples:
    try:
        registered(name).fn(data)
    except UnsupportedKind:
        outcomes.append("unsupported")
    except Exception as exc:
        outcomes.append(f"{type(exc).__name__}: {exc}")
    else:
        outcomes.append("ok")
with open(OUT, "w") as out:
    json.dump({"outcomes": outcomes, "names": [name for name, _ in samples]}, out)
"""
PROBE_DATA = [  # the probe's samples, as the parent sees them (for kinds_of)
    ("jwt:sign", {"algorithm": "HS256"}),
    ("jwt:verify", {"algorithms": ["HS256", "HS512"]}),
    ("crypto:encrypt", {}),
    ("crypto:hash_password", {"scheme": "argon2id"}),
    ("jwt:sign", {"algorithm": "RS256"}),
    ("jwt:sign", {"algorithm": "EdDSA"}),
    ("jwt:verify", {"algorithms": ["HS256", "ES256"]}),
    ("crypto:hash", {}),
    ("crypto:hash_password", {}),
    ("crypto:verify_password", {}),
    ("crypto:decrypt", {}),
    ("compress:zstd", {}),
    ("decompress:zstd", {}),
    ("compress:gzip", {}),
    ("decompress:gzip", {}),
    ("json:transform", {}),
]


def test_declared_kinds_match_what_runs_in_a_subinterpreter(tmp_path: Any) -> None:
    """Each task runs in an isolated subinterpreter exactly when its type's kinds for its data
    include "interpreter"."""
    interpreters = pytest.importorskip("_interpreters")
    out = tmp_path / "outcomes.json"
    stored = t.hash_password("pw", n=16)
    frame = t.compress_zstd(b"frame")
    code = f"STORED = {stored!r}\nFRAME = {frame!r}\nOUT = {str(out)!r}\n{SUBINTERPRETER_PROBE}"
    interp = interpreters.create()
    try:
        failure = interpreters.exec(interp, code)
    finally:
        interpreters.destroy(interp)
    assert failure is None, failure
    report = json.loads(out.read_text())
    assert report["names"] == [name for name, _ in PROBE_DATA]
    assert {name for name, _ in PROBE_DATA} == set(EXPECTED_KINDS)
    for (name, data), outcome in zip(PROBE_DATA, report["outcomes"], strict=True):
        runs_there = "interpreter" in registered(name).kinds_of(data)
        assert outcome == ("ok" if runs_there else "unsupported"), (name, data, outcome)
