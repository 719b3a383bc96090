"""The ``json:transform`` task and its registry of named transformers.

Like task types, transformers are an allow-list: a request names one, it never supplies code.
A ``json:transform`` dict task looks the name up in the caller's process and sends the
transformer to the worker by reference (module and name, as pickle does), so a transformer
registered in your own module works on every worker without further setup: register
module-level functions.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Final, TypeAlias, TypeVar

from .._registry import REGISTRY, prepare_in_caller, task
from ..errors import InvalidInput
from ._common import unpack

__all__ = ("JSONValue", "json_transform", "json_transformer", "transformer_names")

#: Any value ``json.loads`` can return (dict, list, str, int, float, bool, None).
JSONValue: TypeAlias = Any

Transformer = Callable[[JSONValue], JSONValue]
T = TypeVar("T", bound=Transformer)

_transformers = REGISTRY.transformers  # the one registry: task types and transformers
_MAX_DEPTH: Final = 512


def json_transformer(name: str) -> Callable[[T], T]:
    """Register ``fn(document) -> JSON value`` as the transformer ``name``.

    >>> @json_transformer("demo:upper_keys")
    ... def upper_keys(doc):
    ...     return {key.upper(): value for key, value in doc.items()}
    >>> json_transform({"a": 1}, "demo:upper_keys")
    {'A': 1}

    The function receives the parsed document and returns a JSON-compatible value. Raise
    ``offload.InvalidInput`` for documents it cannot handle.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a transformer name must be a non-empty string")

    def register(fn: T) -> T:
        REGISTRY.add_transformer(name, fn)
        return fn

    return register


def transformer_names() -> list[str]:
    """Every registered transformer name, sorted.

    >>> {"identity", "sort_keys", "minify", "flatten"} <= set(transformer_names())
    True
    """
    return sorted(_transformers)


def json_transform(document: JSONValue, transformer: str) -> JSONValue:
    """Apply the registered ``transformer`` to ``document``.

    >>> json_transform('{"b": 1, "a": {"c": [1, 2]}}', "flatten")
    {'b': 1, 'a.c.0': 1, 'a.c.1': 2}
    >>> json_transform({"b": 1, "a": None}, "minify")
    '{"b":1,"a":null}'

    A ``str`` (or ``bytes``) ``document`` is parsed as JSON text (``NaN``/``Infinity`` are
    refused); any other value is used as is. Invalid JSON or an unknown transformer is
    ``InvalidInput``.
    """
    return _apply(document, transformer, _lookup(transformer))


def _lookup(transformer: Any) -> Transformer:
    if not isinstance(transformer, str):
        raise InvalidInput(f"transformer must be a str, not {type(transformer).__name__}")
    fn = _transformers.get(transformer)
    if fn is None:
        raise InvalidInput(
            f"unknown json transformer {transformer[:60]!r}; registered: {transformer_names()}"
        )
    return fn


def _apply(document: JSONValue, transformer: str, fn: Transformer) -> JSONValue:
    """Run the transformer ``fn`` (registered as ``transformer``) on ``document``."""
    parsed = _parse(document)
    try:
        return fn(parsed)
    except RecursionError:
        pass
    raise InvalidInput(f"document is nested too deeply for transformer {transformer!r}")


def _parse(document: JSONValue) -> JSONValue:
    import json

    if isinstance(document, bytes | bytearray | memoryview):
        try:
            document = bytes(document).decode("utf-8")
        except UnicodeDecodeError:
            document = None
        if document is None:
            raise InvalidInput("document bytes are not UTF-8")
    if not isinstance(document, str):
        return document
    error = ""
    try:
        return json.loads(document, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        error = f"document is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    except RecursionError:
        error = "document is nested too deeply"
    except ValueError as exc:
        error = str(exc)
    raise InvalidInput(error)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"document is not valid JSON: {name} is not allowed")


def _dumps(value: JSONValue, **options: Any) -> str:
    import json

    failed = ""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, **options)
    except (TypeError, ValueError) as exc:
        failed = f"document cannot be serialised as JSON: {type(exc).__name__}"
    except RecursionError:
        failed = "document is nested too deeply"
    raise InvalidInput(failed)


# --- built-in transformers -----------------------------------------------------------------


@json_transformer("identity")
def _identity(doc: JSONValue) -> JSONValue:
    """The document, unchanged (useful to validate and parse JSON text)."""
    return doc


@json_transformer("sort_keys")
def _sort_keys(doc: JSONValue) -> JSONValue:
    """Every object's keys in sorted order, recursively."""
    return _walk(doc, lambda obj: {key: obj[key] for key in sorted(obj)})


@json_transformer("strip_nulls")
def _strip_nulls(doc: JSONValue) -> JSONValue:
    """Drop object members whose value is ``null``, recursively (list items are kept)."""
    return _walk(doc, lambda obj: {key: value for key, value in obj.items() if value is not None})


@json_transformer("minify")
def _minify(doc: JSONValue) -> str:
    """The document as compact JSON text (no whitespace, non-ASCII kept)."""
    return _dumps(doc, separators=(",", ":"))


json_transformer("compact")(_minify)


@json_transformer("pretty")
def _pretty(doc: JSONValue) -> str:
    """The document as JSON text indented by two spaces, keys sorted."""
    return _dumps(doc, indent=2, sort_keys=True)


@json_transformer("flatten")
def _flatten(doc: JSONValue) -> JSONValue:
    """Nested objects and lists as one object with dotted paths: ``{"a.b.0": 1}``.

    Empty objects and lists are kept as leaves; a scalar document is returned unchanged.
    Two paths that collide (``{"a.b": 1, "a": {"b": 2}}``) are ``InvalidInput``.
    """
    if not isinstance(doc, dict | list):
        return doc
    if not doc:
        return {}
    flat: dict[str, JSONValue] = {}
    stack: list[tuple[str, JSONValue, int]] = [("", doc, 0)]
    while stack:
        prefix, value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise InvalidInput("document is nested too deeply")
        if isinstance(value, dict) and value:
            items = [(str(key), item) for key, item in value.items()]
        elif isinstance(value, list) and value:
            items = [(str(index), item) for index, item in enumerate(value)]
        else:
            if prefix in flat:
                raise InvalidInput(f"flatten: two values map to the path {prefix[:80]!r}")
            flat[prefix] = value
            continue
        for key, item in reversed(items):
            stack.append((f"{prefix}.{key}" if prefix else key, item, depth + 1))
    return flat


@json_transformer("unflatten")
def _unflatten(doc: JSONValue) -> JSONValue:
    """The inverse of ``flatten`` for objects: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``.

    Every level becomes an object (list indices stay string keys).
    """
    if not isinstance(doc, dict):
        raise InvalidInput("unflatten needs a JSON object")
    root: dict[str, JSONValue] = {}
    for path, value in doc.items():
        node = root
        *parents, leaf = str(path).split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidInput(f"unflatten: {path[:80]!r} conflicts with another key")
            node = child
        if leaf in node:
            raise InvalidInput(f"unflatten: {path[:80]!r} conflicts with another key")
        node[leaf] = value
    return root


def _walk(doc: JSONValue, on_object: Callable[[dict[str, JSONValue]], JSONValue]) -> JSONValue:
    """Rebuild ``doc`` bottom-up, passing every (rebuilt) object through ``on_object``."""
    # Each level costs a few Python frames (the function and a comprehension).
    limit = min(_MAX_DEPTH, (sys.getrecursionlimit() - 100) // 3)

    def visit(value: JSONValue, depth: int) -> JSONValue:
        if depth > limit:
            raise InvalidInput("document is nested too deeply")
        if isinstance(value, dict):
            if not all(isinstance(key, str) for key in value):
                raise InvalidInput("object keys must be strings")
            return on_object({key: visit(item, depth + 1) for key, item in value.items()})
        if isinstance(value, list):
            return [visit(item, depth + 1) for item in value]
        return value

    return visit(doc, 0)


@task("json:transform")
def _json_transform_task(data: Any) -> JSONValue:
    args = unpack(data, "json:transform", ("document", "transformer"))
    return json_transform(args["document"], args["transformer"])


def _prepare_json_transform(data: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """In the caller: check the name here and send its transformer to the worker by reference."""
    args = unpack(data, "json:transform", ("document", "transformer"))
    name, fn = args["transformer"], _lookup(args["transformer"])
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise InvalidInput(
            f"json transformer {name!r} is {qualname}: workers import transformers by "
            "reference, so register a module-level function"
        )
    return _apply, (args["document"], name, fn)


prepare_in_caller("json:transform", _prepare_json_transform)
