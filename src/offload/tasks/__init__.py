"""offload's built-in task types, registered when this package is imported.

=========================  ==========================================  ==================
type                       function                                    worker kinds
=========================  ==========================================  ==================
``jwt:sign``               :func:`jwt_sign`                            all (RS256, ES256,
                                                                       EdDSA: process,
                                                                       dask)
``jwt:verify``             :func:`jwt_verify`                          all (RS256, ES256,
                                                                       EdDSA allowed:
                                                                       process, dask)
``crypto:hash``            :func:`digest`                              all
``crypto:hash_password``   :func:`hash_password`                       all (argon2id:
                                                                       process, dask)
``crypto:verify_password`` :func:`verify_password`                     all (argon2id:
                                                                       process, dask)
``crypto:encrypt``         :func:`encrypt`                             process, dask
``crypto:decrypt``         :func:`decrypt`                             process, dask
``compress:zstd``          :func:`compress_zstd`                       all on 3.14+ (stdlib
                                                                       zstd); before:
                                                                       process, dask
``decompress:zstd``        :func:`decompress_zstd`                     as compress:zstd
``compress:gzip``          :func:`compress_gzip`                       all
``decompress:gzip``        :func:`decompress_gzip`                     all
``json:transform``         :func:`json_transform`                      all
=========================  ==========================================  ==================

Each type is a dict task, ``await wm.execute_task({"type": "crypto:hash", "data": {...}})``;
each function is also a plain, picklable callable for ``wm.run``::

    encoded = await wm.run(offload.tasks.hash_password, "hunter2")
    ok = await wm.run(offload.tasks.verify_password, "hunter2", encoded)

Importing this package is cheap: ``jwt``, ``cryptography``, ``zstandard`` and
``compression.zstd`` are imported only when a task runs.
"""

from __future__ import annotations

from ._compress import (
    DEFAULT_MAX_OUTPUT_SIZE,
    STDLIB_ZSTD,
    compress_gzip,
    compress_zstd,
    decompress_gzip,
    decompress_zstd,
)
from ._crypto import (
    ENVELOPE_HEADER,
    HASH_ALGORITHMS,
    decrypt,
    digest,
    encrypt,
    hash_password,
    verify_password,
)
from ._json import JSONValue, json_transform, json_transformer, transformer_names
from ._jwt import (
    HMAC_MIN_KEY_BYTES,
    JWT_ALGORITHMS,
    RSA_MIN_KEY_BITS,
    JwtReason,
    JwtVerifyResult,
    jwt_sign,
    jwt_verify,
)

__all__ = (
    "DEFAULT_MAX_OUTPUT_SIZE",
    "ENVELOPE_HEADER",
    "HASH_ALGORITHMS",
    "HMAC_MIN_KEY_BYTES",
    "JSONValue",
    "JWT_ALGORITHMS",
    "RSA_MIN_KEY_BITS",
    "STDLIB_ZSTD",
    "JwtReason",
    "JwtVerifyResult",
    "compress_gzip",
    "compress_zstd",
    "decompress_gzip",
    "decompress_zstd",
    "decrypt",
    "digest",
    "encrypt",
    "hash_password",
    "json_transform",
    "json_transformer",
    "jwt_sign",
    "jwt_verify",
    "transformer_names",
    "verify_password",
)
