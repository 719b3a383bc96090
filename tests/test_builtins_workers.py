"""Built-in tasks through a real WorkerManager: every type on process workers, routing on
interpreter managers, errors arriving as themselves, the typed facade, examples/auth.py."""

from __future__ import annotations

import functools
import subprocess
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest

import offload
import offload.tasks
from conftest import requires_interpreters
from offload import (
    DecryptFailed,
    InvalidInput,
    OutputTooLarge,
    Task,
    UnsupportedKind,
    WorkerManager,
    builtins,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KEY = bytes(range(32))
SECRET = "s" * 32


def manager(**options: Any) -> WorkerManager:
    options.setdefault("workers", 2)
    options.setdefault("max_queue", 100)
    options.setdefault("shutdown_grace", 10.0)
    return WorkerManager(**options)


async def run(wm: WorkerManager, type_: str, data: dict[str, Any]) -> Any:
    return await wm.execute_task({"type": type_, "data": data, "timeout": 30})


async def exercise_every_builtin(wm: WorkerManager) -> None:
    """One call of every built-in type, each checked against a direct call."""
    token = await run(wm, "jwt:sign", {"claims": {"sub": "7"}, "key": SECRET, "expires_in": 60})
    verified = await run(wm, "jwt:verify", {"token": token, "key": SECRET, "algorithms": ["HS256"]})
    assert verified["valid"] is True
    assert verified["claims"]["sub"] == "7"
    expired = offload.tasks.jwt_sign({"exp": 1}, SECRET)
    verdict = await run(
        wm, "jwt:verify", {"token": expired, "key": SECRET, "algorithms": ["HS256"]}
    )
    assert verdict == {"valid": False, "claims": None, "reason": "expired"}

    assert await run(wm, "crypto:hash", {"data": "abc"}) == offload.tasks.digest("abc")
    stored = await run(wm, "crypto:hash_password", {"password": "pw", "n": 2**10})
    assert stored.startswith("$scrypt$ln=10,")
    assert await run(wm, "crypto:verify_password", {"password": "pw", "hash": stored}) is True
    assert await run(wm, "crypto:verify_password", {"password": "px", "hash": stored}) is False

    box = await run(wm, "crypto:encrypt", {"plaintext": b"secret", "key": KEY, "aad": b"a"})
    assert await run(wm, "crypto:decrypt", {"ciphertext": box, "key": KEY, "aad": b"a"}) == (
        b"secret"
    )

    for codec in ("zstd", "gzip"):
        frame = await run(wm, f"compress:{codec}", {"data": b"z" * 10_000, "level": 5})
        assert len(frame) < 200
        assert await run(wm, f"decompress:{codec}", {"data": frame}) == b"z" * 10_000

    assert await run(
        wm, "json:transform", {"document": '{"b": 1, "a": {"c": 2}}', "transformer": "flatten"}
    ) == {"b": 1, "a.c": 2}


@pytest.mark.asyncio
async def test_every_builtin_runs_on_process_workers() -> None:
    async with manager(kind="process") as wm:
        await exercise_every_builtin(wm)


@pytest.mark.asyncio
async def test_errors_come_back_as_themselves_without_secrets() -> None:
    marker = "S3CRET" + uuid.uuid4().hex
    async with manager(kind="process") as wm:
        with pytest.raises(DecryptFailed) as decrypt_info:
            await run(wm, "crypto:decrypt", {"ciphertext": b"OFE\x01" + bytes(40), "key": KEY})
        with pytest.raises(InvalidInput) as key_info:
            await run(wm, "jwt:sign", {"claims": {}, "key": marker, "algorithm": "RS256"})
        with pytest.raises(InvalidInput) as alg_info:
            await run(wm, "jwt:verify", {"token": marker, "key": marker, "algorithms": []})
        with pytest.raises(InvalidInput) as frame_info:
            await run(wm, "decompress:zstd", {"data": b"not a frame"})
        bomb = offload.tasks.compress_gzip(bytes(1 << 20))
        with pytest.raises(OutputTooLarge) as size_info:
            await run(wm, "decompress:gzip", {"data": bomb, "max_output_size": 1000})
    infos = (decrypt_info, key_info, alg_info, frame_info, size_info)
    codes = [info.value.code for info in infos]
    assert codes == [
        "DECRYPT_FAILED",
        "INVALID_INPUT",
        "INVALID_INPUT",
        "INVALID_INPUT",
        "OUTPUT_TOO_LARGE",
    ]
    for info in infos:
        text = "".join(traceback.format_exception(info.value))  # remote traceback included
        assert marker not in text
        assert marker not in repr(info.value)


@pytest.mark.asyncio
async def test_plain_functions_run_with_wm_run() -> None:
    async with manager(kind="process") as wm:
        stored = await wm.run(functools.partial(offload.tasks.hash_password, n=2**10), "pw")
        assert await wm.run(offload.tasks.verify_password, "pw", stored) is True
        task = Task(offload.tasks.compress_zstd, args=(b"q" * 1000,), kwargs={"level": 19})
        frame = await wm.execute_task(task)
        assert await wm.run(offload.tasks.decompress_zstd, frame) == b"q" * 1000
        assert await wm.run(offload.tasks.json_transform, [3, {"b": 1, "a": 2}], "sort_keys") == [
            3,
            {"a": 2, "b": 1},
        ]


@pytest.mark.asyncio
async def test_typed_facade() -> None:
    async with manager(kind="process") as wm:
        secret384 = "s" * 48  # RFC 7518: as long as the hash output
        token = await builtins.jwt_sign(
            wm, {"sub": "9"}, secret384, algorithm="HS384", expires_in=30, priority="high"
        )
        result = await builtins.jwt_verify(wm, token, secret384, algorithms=["HS384"], timeout=10)
        assert result["valid"] is True
        assert result["claims"] is not None
        assert result["claims"]["sub"] == "9"
        assert await builtins.hash(wm, b"abc", "sha3_256") == offload.tasks.digest(
            b"abc", algorithm="sha3_256"
        )
        assert len(await builtins.hash(wm, b"abc", output="raw")) == 32
        stored = await builtins.hash_password(wm, "pw", n=2**10, r=4, priority="low")
        assert stored.startswith("$scrypt$ln=10,r=4,p=2$")
        assert await builtins.verify_password(wm, "pw", stored) is True
        box = await builtins.encrypt(wm, "hi", KEY, aad="ctx")
        assert await builtins.decrypt(wm, box, KEY, aad="ctx") == b"hi"
        with pytest.raises(DecryptFailed):
            await builtins.decrypt(wm, box, KEY)
        codecs: tuple[builtins.Codec, ...] = ("zstd", "gzip")
        for codec in codecs:
            frame = await builtins.compress(wm, b"w" * 5000, codec, level=1)
            assert await builtins.decompress(wm, frame, codec) == b"w" * 5000
            with pytest.raises(OutputTooLarge):
                await builtins.decompress(wm, frame, codec, max_output_size=4999)
        with pytest.raises(InvalidInput, match="zstd"):
            await builtins.compress(wm, b"x", "brotli")  # type: ignore[arg-type]
        assert await builtins.json_transform(wm, {"b": None, "a": 1}, "strip_nulls") == {"a": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kind", ["process", pytest.param("interpreter", marks=requires_interpreters)]
)
async def test_a_transformer_registered_in_your_module_runs_on_fresh_workers(kind: str) -> None:
    import json_transformers  # registers "test:shout" here; no task imports that module

    async with manager(kind=kind, workers=1) as wm:
        shouted = await run(
            wm, "json:transform", {"document": '{"a": 1}', "transformer": "test:shout"}
        )
        assert shouted == {"A": 1}
        assert await builtins.json_transform(wm, {"b": 2}, "test:shout") == {"B": 2}
        # Names are still checked (here, before anything is queued), and code never travels
        # from a request: an unknown name is refused whatever the worker has loaded.
        with pytest.raises(InvalidInput, match="unknown json transformer"):
            await run(wm, "json:transform", {"document": "{}", "transformer": "os.system"})
        assert wm.stats().submitted == 2
    assert json_transformers.shout({"x": 1}) == {"X": 1}


@pytest.mark.asyncio
async def test_a_transformer_that_workers_cannot_import_is_refused_clearly() -> None:
    offload.tasks.json_transformer("test:local")(lambda doc: doc)
    async with manager(kind="process", workers=1) as wm:
        with pytest.raises(InvalidInput, match="module-level function"):
            await run(wm, "json:transform", {"document": "{}", "transformer": "test:local"})


@requires_interpreters
@pytest.mark.asyncio
async def test_interpreter_manager_routes_process_only_types_to_process_workers() -> None:
    async with manager(kind="interpreter", workers=1, process_workers=1) as wm:
        await exercise_every_builtin(wm)
        # argon2id needs cryptography: that password type goes to the process worker.
        stored = await builtins.hash_password(
            wm, "pw", scheme="argon2id", memory_cost=64, time_cost=1
        )
        assert stored.startswith("$argon2id$")
        assert await builtins.verify_password(wm, "pw", stored) is True


@requires_interpreters
@pytest.mark.asyncio
async def test_interpreter_manager_without_process_workers_refuses_process_only_types() -> None:
    async with manager(kind="interpreter", workers=1) as wm:
        # What runs in a subinterpreter does.
        assert await builtins.hash(wm, "abc") == offload.tasks.digest("abc")
        stored = await builtins.hash_password(wm, "pw", n=2**10)
        assert await builtins.verify_password(wm, "pw", stored) is True
        frame = await builtins.compress(wm, b"g" * 100, "gzip")
        assert await builtins.decompress(wm, frame, "gzip") == b"g" * 100
        assert await builtins.json_transform(wm, "[1]", "identity") == [1]
        token = await builtins.jwt_sign(wm, {"sub": "1"}, SECRET)
        assert (await builtins.jwt_verify(wm, token, SECRET, algorithms=["HS256"]))["valid"]
        # What does not is refused up front, with the reason.
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("crypto:hash_password", {"password": "pw", "scheme": "argon2id"}, "cryptography"),
            ("jwt:sign", {"claims": {}, "key": SECRET, "algorithm": "RS256"}, "cryptography"),
            (
                "jwt:verify",
                {"token": token, "key": SECRET, "algorithms": ["HS256", "EdDSA"]},
                "cryptography",
            ),
            ("crypto:encrypt", {"plaintext": b"x", "key": KEY}, "cryptography"),
        ]
        if not offload.tasks.STDLIB_ZSTD:
            cases += [
                ("compress:zstd", {"data": b"x"}, "zstandard"),
                ("decompress:zstd", {"data": b"x"}, "zstandard"),
            ]
        for type_, data, why in cases:
            with pytest.raises(UnsupportedKind, match=why) as info:
                await run(wm, type_, data)
            assert info.value.code == "UNSUPPORTED_KIND"
        # A plain function sent with wm.run fails inside the worker, just as clearly.
        with pytest.raises(UnsupportedKind, match="cryptography"):
            await wm.run(offload.tasks.encrypt, b"x", KEY)
        with pytest.raises(UnsupportedKind, match="cryptography"):
            await wm.run(functools.partial(offload.tasks.jwt_sign, algorithm="ES256"), {}, "k")
        if not offload.tasks.STDLIB_ZSTD:
            with pytest.raises(UnsupportedKind, match="zstandard"):
                await wm.run(offload.tasks.compress_zstd, b"x")


@requires_interpreters
@pytest.mark.asyncio
async def test_hmac_jwt_runs_on_interpreter_workers() -> None:
    """HS256/384/512 sign and verify in a subinterpreter (PyJWT loads there HMAC-only), and
    the tokens are the ones a process signs: each verifies on the other side."""
    async with manager(kind="interpreter", workers=1) as wm:
        for alg in ("HS256", "HS384", "HS512"):
            secret = "h" * offload.tasks.HMAC_MIN_KEY_BYTES[alg]
            claims = {"sub": "7", "aud": "api", "n": [1, 2.5, None]}
            token = await run(wm, "jwt:sign", {"claims": claims, "key": secret, "algorithm": alg})
            assert token == offload.tasks.jwt_sign(claims, secret, algorithm=alg)
            here = offload.tasks.jwt_sign(claims | {"iss": "me"}, secret, algorithm=alg)
            verdict = await run(
                wm,
                "jwt:verify",
                {"token": here, "key": secret, "algorithms": [alg], "audience": "api"},
            )
            assert verdict == {"valid": True, "claims": claims | {"iss": "me"}, "reason": None}
            tampered = here[:-2] + ("AA" if not here.endswith("AA") else "BB")
            verdict = await run(
                wm,
                "jwt:verify",
                {"token": tampered, "key": secret, "algorithms": [alg], "audience": "api"},
            )
            assert verdict["reason"] == "invalid_signature"
        # Bad input is refused there as anywhere, without the key.
        with pytest.raises(InvalidInput, match="'sub'"):
            await run(wm, "jwt:sign", {"claims": {"sub": 42}, "key": SECRET})
        marker = "S3CRET" + uuid.uuid4().hex[:8]  # 14 bytes
        with pytest.raises(InvalidInput, match="HS256 needs at least 32 bytes") as info:
            await run(wm, "jwt:sign", {"claims": {}, "key": marker})
        assert marker not in "".join(traceback.format_exception(info.value))
        assert wm.stats().submitted == 11  # all on the one interpreter worker


@requires_interpreters
@pytest.mark.asyncio
async def test_asymmetric_jwt_goes_to_the_process_workers_of_an_interpreter_manager() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    async with manager(kind="interpreter", workers=1, process_workers=1) as wm:
        token = await run(
            wm, "jwt:sign", {"claims": {"sub": "e"}, "key": pem, "algorithm": "EdDSA"}
        )
        verdict = await run(
            wm, "jwt:verify", {"token": token, "key": pem, "algorithms": ["EdDSA", "HS256"]}
        )
        assert verdict["valid"] is True
        hs = await run(wm, "jwt:sign", {"claims": {"sub": "h"}, "key": SECRET})
        assert offload.tasks.jwt_verify(hs, SECRET, algorithms=["HS256"])["valid"] is True


@requires_interpreters
@pytest.mark.asyncio
async def test_zstd_runs_on_interpreter_workers_with_the_stdlib_codec() -> None:
    if not offload.tasks.STDLIB_ZSTD:
        pytest.skip("compression.zstd (Python 3.14+) is what loads in a subinterpreter")
    import zstandard

    data = b"zstd in a subinterpreter " * 400
    async with manager(kind="interpreter", workers=1) as wm:
        frame = await builtins.compress(wm, data, "zstd", level=19)
        assert zstandard.ZstdDecompressor().decompress(frame) == data
        other = zstandard.ZstdCompressor(level=5).compress(data)
        assert await builtins.decompress(wm, other + frame, "zstd") == data * 2
        with pytest.raises(OutputTooLarge):
            await builtins.decompress(wm, frame, "zstd", max_output_size=len(data) - 1)
        with pytest.raises(InvalidInput):
            await builtins.decompress(wm, frame + bytes(8), "zstd")
        assert await wm.run(offload.tasks.decompress_zstd, frame) == data


def test_auth_example_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "auth.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "token issued: True",
        "token valid: True, subject: alice",
        "forged token valid: False, reason: invalid_signature",
        "password hash scheme: scrypt",
        "right password accepted: True",
        "wrong password accepted: False",
    ]
