"""crypto:hash, crypto:hash_password / verify_password, crypto:encrypt / decrypt, directly."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import offload.tasks as t
from offload import DecryptFailed, InvalidInput, OffloadError
from offload._registry import registered
from offload.tasks._crypto import aes_gcm_open, aes_gcm_seal, scrypt
from test_builtins import assert_no_leak

# --- crypto:hash --------------------------------------------------------------------------

ABC = {
    "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    "sha512": (
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
    ),
    "sha3_256": "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532",
    "blake2b": (
        "ba80a53f981c4d0d6a2797b69f12f6e94c212f14685ac4b74b12bb6fdbffa2d1"
        "7d87c5392aab792dc252d5de4533cc9518d38aa8dbf1925ab92386edd4009923"
    ),
}


@pytest.mark.parametrize(("algorithm", "expected"), sorted(ABC.items()))
def test_hash_known_answers(algorithm: str, expected: str) -> None:
    assert t.digest(b"abc", algorithm=algorithm) == expected
    assert t.digest("abc", algorithm=algorithm) == expected
    assert t.digest(b"abc", algorithm=algorithm, output="raw") == bytes.fromhex(expected)
    task = registered("crypto:hash").fn
    assert task({"data": "abc", "algorithm": algorithm}) == expected
    assert task({"data": b"abc", "algorithm": algorithm, "output": "raw"}).hex() == expected


def test_hash_defaults_aliases_and_rejections() -> None:
    assert registered("crypto:hash").fn({"data": b"abc"}) == ABC["sha256"]
    assert t.digest("abc", algorithm="SHA3-256") == ABC["sha3_256"]
    assert t.digest("\u00e9") == t.digest("\u00e9".encode())
    for algorithm in ("md5", "sha1", "crc32", ""):
        with pytest.raises(InvalidInput, match="unsupported hash algorithm"):
            t.digest(b"abc", algorithm=algorithm)
    with pytest.raises(InvalidInput, match="output"):
        registered("crypto:hash").fn({"data": b"abc", "output": "base64"})
    with pytest.raises(InvalidInput, match="data"):
        t.digest(123)  # type: ignore[call-overload]


# --- scrypt: RFC 7914 section 12 ----------------------------------------------------------

RFC7914 = [
    (
        b"",
        b"",
        16,
        1,
        1,
        "77d6576238657b203b19ca42c18a0497f16b4844e3074ae8dfdffa3fede21442"
        "fcd0069ded0948f8326a753a0fc81f17e8d3e0fb2e0d3628cf35e20c38d18906",
    ),
    (
        b"password",
        b"NaCl",
        1024,
        8,
        16,
        "fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162"
        "2eaf30d92e22a3886ff109279d9830dac727afb94a83ee6d8360cbdfa2cc0640",
    ),
    (
        b"pleaseletmein",
        b"SodiumChloride",
        16384,
        8,
        1,
        "7023bdcb3afd7348461c06cd81fd38ebfda8fbba904f8e3ea9b543f6545da1f2"
        "d5432955613f0fcf62d49705242a9af9e61e85dc0d651e40dfcf017b45575887",
    ),
]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(("password", "salt", "n", "r", "p", "expected"), RFC7914)
def test_scrypt_rfc7914_vectors(
    password: bytes, salt: bytes, n: int, r: int, p: int, expected: str
) -> None:
    assert scrypt(password, salt, n=n, r=r, p=p, length=64).hex() == expected
    # The same vector as a stored hash goes through verify_password's parser and compare.
    encoded = (
        f"$scrypt$ln={n.bit_length() - 1},r={r},p={p}${_b64(salt)}${_b64(bytes.fromhex(expected))}"
    )
    assert t.verify_password(password, encoded) is True
    assert t.verify_password(password + b"!", encoded) is False


def test_hash_password_default_is_scrypt_with_sane_cost() -> None:
    encoded = t.hash_password("correct horse")
    match = re.fullmatch(
        r"\$scrypt\$ln=16,r=8,p=2\$([A-Za-z0-9+/]{22})\$([A-Za-z0-9+/]{43})", encoded
    )
    assert match, encoded
    assert t.verify_password("correct horse", encoded) is True
    assert t.verify_password("correct horsE", encoded) is False
    # A fresh random salt each time.
    assert t.hash_password("x", n=2**4) != t.hash_password("x", n=2**4)


def test_argon2id_phc_strings_interoperate() -> None:
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

    encoded = t.hash_password("pw", scheme="argon2id", time_cost=1, memory_cost=64, parallelism=2)
    assert re.fullmatch(
        r"\$argon2id\$v=19\$m=64,t=1,p=2\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}", encoded
    )
    assert t.verify_password("pw", encoded) is True
    assert t.verify_password("pW", encoded) is False
    if hasattr(Argon2id, "verify_phc_encoded"):  # cryptography >= 45
        Argon2id.verify_phc_encoded(b"pw", encoded)
        theirs = Argon2id(salt=b"s" * 16, length=32, iterations=1, lanes=1, memory_cost=64)
        assert t.verify_password("pw", theirs.derive_phc_encoded(b"pw")) is True


def test_argon2id_default_cost() -> None:
    encoded = registered("crypto:hash_password").fn({"password": "pw", "scheme": "argon2id"})
    assert encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert registered("crypto:verify_password").fn({"password": "pw", "hash": encoded}) is True


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "plaintext",
        "$2b$12$abcdefghijklmnopqrstuv",  # bcrypt: not supported
        "$scrypt$ln=16,r=8,p=1$c2FsdA",
        "$scrypt$ln=16,r=8,p=1$!!!!$aGFzaGhhc2hoYXNoaGFzaA",
        "$scrypt$ln=30,r=8,p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # too costly to even try
        "$scrypt$ln=20,r=64,p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",
        "$scrypt$ln=4,r=1,p=1$c2FsdA$aGFzaA",  # hash too short
        "$argon2id$v=16$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=99999999,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "$argon2id$v=19$m=64,t=1,p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA",  # salt too short
        "$argon2i$v=19$m=64,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    ],
)
def test_verify_password_rejects_malformed_hashes(stored: str) -> None:
    with pytest.raises(InvalidInput):
        t.verify_password("pw", stored)


@pytest.mark.parametrize(
    "options",
    [
        {"n": 1000},
        {"n": 2**21},
        {"n": True},
        {"r": 0},
        {"scheme": "md5"},
        {"time_cost": 1},
        {"scheme": "argon2id", "n": 2**10},
        {"scheme": "argon2id", "memory_cost": 8, "parallelism": 4},
    ],
)
def test_hash_password_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        t.hash_password("pw", **options)


@settings(max_examples=20, deadline=None)
@given(password=st.text(max_size=40) | st.binary(max_size=40), other=st.binary(max_size=8))
def test_password_round_trip_property(password: str | bytes, other: bytes) -> None:
    encoded = t.hash_password(password, n=2**4, r=1)
    assert t.verify_password(password, encoded) is True
    raw = password.encode("utf-8", "surrogatepass") if isinstance(password, str) else password
    # (Not a NUL suffix: HMAC zero-pads keys, so scrypt treats b"pw" and b"pw\0" alike.)
    assert t.verify_password(raw + b"!" + other, encoded) is False


# --- crypto:encrypt / crypto:decrypt ------------------------------------------------------

# McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16 (AES-256, 96-bit IV).
GCM_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
GCM_IV = bytes.fromhex("cafebabefacedbaddecaf888")
GCM_PT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
GCM_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
GCM_CT = bytes.fromhex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
)
GCM_TAG = bytes.fromhex("76fc6ece0f4e1768cddf8853bb2d551b")


def test_aes_gcm_known_answer() -> None:
    assert aes_gcm_seal(GCM_KEY, GCM_IV, GCM_PT, GCM_AAD) == GCM_CT + GCM_TAG
    assert aes_gcm_open(GCM_KEY, GCM_IV, GCM_CT + GCM_TAG, GCM_AAD) == GCM_PT


def test_envelope_layout() -> None:
    """header | nonce | AES-GCM(key, nonce, plaintext, aad=header + aad) — checked by hand."""
    envelope = (
        t.ENVELOPE_HEADER
        + GCM_IV
        + aes_gcm_seal(GCM_KEY, GCM_IV, GCM_PT, t.ENVELOPE_HEADER + GCM_AAD)
    )
    assert t.decrypt(envelope, GCM_KEY, aad=GCM_AAD) == GCM_PT
    box = t.encrypt(GCM_PT, GCM_KEY, aad=GCM_AAD)
    assert box[:4] == t.ENVELOPE_HEADER == b"OFE\x01"
    assert len(box) == 4 + 12 + len(GCM_PT) + 16
    nonce = box[4:16]
    assert aes_gcm_open(GCM_KEY, nonce, box[16:], t.ENVELOPE_HEADER + GCM_AAD) == GCM_PT


def test_encrypt_round_trips_and_uses_fresh_nonces() -> None:
    key = bytes(range(32))
    assert t.decrypt(t.encrypt(b"", key), key) == b""
    assert (
        t.decrypt(t.encrypt("h\u00e9llo", key, aad="ctx"), key, aad=b"ctx") == "h\u00e9llo".encode()
    )
    assert t.decrypt(t.encrypt(b"x", bytearray(key)), memoryview(key)) == b"x"  # type: ignore[arg-type]
    assert t.encrypt(b"same", key)[4:16] != t.encrypt(b"same", key)[4:16]
    box = registered("crypto:encrypt").fn({"plaintext": b"p", "key": key, "aad": b"a"})
    assert registered("crypto:decrypt").fn({"ciphertext": box, "key": key, "aad": b"a"}) == b"p"


def test_every_tampered_byte_fails() -> None:
    key = bytes(range(32))
    box = t.encrypt(b"attack at dawn", key, aad=b"id:1")
    for index in range(len(box)):
        tampered = bytearray(box)
        tampered[index] ^= 0x01
        with pytest.raises(DecryptFailed) as info:
            t.decrypt(bytes(tampered), key, aad=b"id:1")
        assert info.value.code == "DECRYPT_FAILED"


def test_truncated_extended_wrong_key_wrong_aad_fail() -> None:
    key = bytes(range(32))
    box = t.encrypt(b"attack at dawn", key, aad=b"id:1")
    bad = [box[:cut] for cut in (0, 1, 4, 16, 31, 32, len(box) - 1)]
    bad.append(box + b"\x00")
    for ciphertext in bad:
        with pytest.raises(DecryptFailed):
            t.decrypt(ciphertext, key, aad=b"id:1")
    for wrong_key, aad in ((bytes(32), b"id:1"), (key, b"id:2"), (key, None), (key, b"")):
        with pytest.raises(DecryptFailed):
            t.decrypt(box, wrong_key, aad=aad)
    # And without aad at encryption, any aad at decryption fails.
    plain = t.encrypt(b"x", key)
    with pytest.raises(DecryptFailed):
        t.decrypt(plain, key, aad=b"id:1")


@pytest.mark.parametrize(
    ("plaintext", "key"),
    [(b"x", bytes(16)), (b"x", bytes(33)), (b"x", "k" * 32), (b"x", None), (None, bytes(32))],
)
def test_encrypt_rejects_bad_keys_and_input(plaintext: Any, key: Any) -> None:
    with pytest.raises(InvalidInput):
        t.encrypt(plaintext, key)


def test_decrypt_rejects_a_str_ciphertext() -> None:
    with pytest.raises(InvalidInput, match="ciphertext"):
        t.decrypt("T0ZFAQ==", bytes(32))  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(
    plaintext=st.binary(max_size=2048),
    key=st.binary(min_size=32, max_size=32),
    aad=st.binary(max_size=64),
)
def test_encrypt_round_trip_property(plaintext: bytes, key: bytes, aad: bytes) -> None:
    box = t.encrypt(plaintext, key, aad=aad)
    assert len(box) == len(plaintext) + 32
    assert t.decrypt(box, key, aad=aad) == plaintext


# --- no leaks -----------------------------------------------------------------------------


def test_crypto_errors_never_contain_secrets() -> None:
    marker = "S3CRET" + uuid.uuid4().hex
    key32 = marker[:32].encode()
    box = t.encrypt(b"payload", key32)
    cases: list[Callable[[], object]] = [
        lambda: t.decrypt(box, marker[1:33].encode()),
        lambda: t.decrypt(box[:-1], key32),
        lambda: t.encrypt(b"x", marker),  # type: ignore[arg-type]
        lambda: t.encrypt(b"x", marker.encode()),
        lambda: t.hash_password(marker, scheme="md5"),  # type: ignore[arg-type]
        lambda: t.hash_password(marker, n=3),
        lambda: t.verify_password(marker, "$scrypt$" + marker),
        lambda: t.verify_password(marker, marker),
        lambda: t.digest(marker, algorithm=marker),
    ]
    for case in cases:
        with pytest.raises(OffloadError) as info:
            case()
        assert_no_leak(info.value, marker, marker[1:33], key32)
