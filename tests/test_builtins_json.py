"""json:transform directly: the built-in transformers, registration, bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import offload.tasks as t
from offload import InvalidInput
from offload._registry import registered

DOC = {"b": 1, "a": {"d": [1, {"z": None, "y": True}], "c": None}, "e": "\u00e9"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def transform(document: Any, transformer: str) -> Any:
    return registered("json:transform").fn({"document": document, "transformer": transformer})


def test_builtin_transformers() -> None:
    text = json.dumps(DOC)
    assert transform(text, "identity") == DOC
    assert transform(DOC, "identity") == DOC
    sorted_doc = transform(text, "sort_keys")
    assert json.dumps(sorted_doc) == json.dumps(DOC, sort_keys=True)
    assert transform(DOC, "minify") == json.dumps(DOC, separators=(",", ":"), ensure_ascii=False)
    assert transform(DOC, "compact") == transform(DOC, "minify")
    assert transform(DOC, "pretty") == json.dumps(DOC, indent=2, sort_keys=True, ensure_ascii=False)
    assert transform(DOC, "strip_nulls") == {"b": 1, "a": {"d": [1, {"y": True}]}, "e": "\u00e9"}
    assert transform(DOC, "flatten") == {
        "b": 1,
        "a.d.0": 1,
        "a.d.1.z": None,
        "a.d.1.y": True,
        "a.c": None,
        "e": "\u00e9",
    }
    assert transform({"a.b": 1, "a.c": 2, "d": 3}, "unflatten") == {"a": {"b": 1, "c": 2}, "d": 3}
    assert {"identity", "sort_keys", "minify", "compact", "flatten"} <= set(t.transformer_names())


def test_flatten_edge_cases() -> None:
    assert t.json_transform(5, "flatten") == 5
    assert t.json_transform({}, "flatten") == {}
    assert t.json_transform({"a": {}, "b": []}, "flatten") == {"a": {}, "b": []}
    with pytest.raises(InvalidInput, match="path"):
        t.json_transform({"a.b": 1, "a": {"b": 2}}, "flatten")
    with pytest.raises(InvalidInput, match="conflicts"):
        t.json_transform({"a": 1, "a.b": 2}, "unflatten")


def test_bytes_documents_and_json_strings() -> None:
    assert t.json_transform(b'{"a": [1]}', "identity") == {"a": [1]}
    # A str document is JSON text: '"x"' is the string x.
    assert t.json_transform('"x"', "identity") == "x"


@pytest.mark.parametrize(
    "document",
    ["", "{", "{'a': 1}", "[1,]", "NaN", '{"a": Infinity}', "[" * 100_000, b"\xff\xfe"],
)
def test_invalid_json_is_invalid_input(document: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        transform(document, "identity")
    assert info.value.code == "INVALID_INPUT"


def test_too_deep_values_are_invalid_input() -> None:
    deep: Any = []
    for _ in range(2000):
        deep = [deep]
    for name in ("sort_keys", "strip_nulls", "flatten"):
        with pytest.raises(InvalidInput, match="deep"):
            t.json_transform(deep, name)


def test_unknown_transformer() -> None:
    with pytest.raises(InvalidInput, match="unknown json transformer") as info:
        transform({}, "no-such-transformer")
    assert "sort_keys" in str(info.value)  # it lists what exists
    with pytest.raises(InvalidInput, match="transformer must be a str"):
        transform({}, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="missing"):
        registered("json:transform").fn({"document": {}})


@t.json_transformer("test:count_keys")
def count_keys(doc: Any) -> int:
    return len(doc) if isinstance(doc, dict) else 0


def test_register_a_transformer() -> None:
    assert transform('{"a": 1, "b": 2}', "test:count_keys") == 2
    # Registering the same function again is fine; another function under the name is not.
    t.json_transformer("test:count_keys")(count_keys)
    with pytest.raises(ValueError, match="already registered"):
        t.json_transformer("test:count_keys")(lambda doc: doc)
    with pytest.raises(ValueError, match="non-empty"):
        t.json_transformer("")


@settings(max_examples=60, deadline=None)
@given(doc=json_values)
def test_transformers_preserve_the_document_property(doc: Any) -> None:
    if isinstance(doc, str):  # a str document is JSON text, not a JSON string value
        assert t.json_transform(json.dumps(doc), "identity") == doc
        doc = [doc]
    assert t.json_transform(doc, "identity") == doc
    assert t.json_transform(doc, "sort_keys") == doc  # dict equality ignores order
    assert json.loads(t.json_transform(doc, "minify")) == doc
    assert json.loads(t.json_transform(json.dumps(doc), "pretty")) == doc


@settings(max_examples=60, deadline=None)
@given(
    doc=st.dictionaries(
        st.text(alphabet="abc", min_size=1, max_size=3),
        st.recursive(
            st.integers() | st.text(max_size=3),
            lambda inner: st.dictionaries(
                st.text(alphabet="abc", min_size=1, max_size=3), inner, min_size=1, max_size=3
            ),
            max_leaves=10,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_unflatten_inverts_flatten_property(doc: dict[str, Any]) -> None:
    assert t.json_transform(t.json_transform(doc, "flatten"), "unflatten") == doc
