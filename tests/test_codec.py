"""Tests for tether.codec: typed argument decoding (ArgsSpec) and error_info."""

from __future__ import annotations

import traceback
from typing import Any

import msgspec
import pytest

from tether import codec
from tether.codec import ArgsSpec, error_info
from tether.errors import BadRequest, RemoteError

enc = msgspec.msgpack.encode


class Point(msgspec.Struct):
    x: int
    y: int


class Shape(msgspec.Struct):
    name: str
    points: list[Point]


class Custom(Exception):
    pass


class Outer:
    class Inner(Exception):
        pass


def typed(call: Any, x: int, name: str, point: Point, items: list[int]) -> None: ...


def with_defaults(call: Any, a: int, b: str = "dflt", c: float = 1.5) -> None: ...


def untyped(call: Any, a, b: int):  # type: ignore[no-untyped-def]
    ...


def variadic(call: Any, *args: Any) -> None: ...


def typed_then_variadic(call: Any, a: int, *rest: int) -> None: ...


def kw_default(call: Any, a: int, *, flag: bool = False) -> None: ...


def kw_required(call: Any, a: int, *, flag: bool) -> None: ...


def no_args(call: Any) -> None: ...


def nested(call: Any, shape: Shape, table: dict[str, list[int]]) -> None: ...


def optional(call: Any, v: int | None, tag: str | int) -> None: ...


def unresolvable(call: Any, a: int, b: NotDefinedAnywhere) -> None: ...  # type: ignore[name-defined]  # noqa: F821


def bad(spec: ArgsSpec, args: object) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        spec.decode(enc(args))
    return info.value


# -- typed decoding ------------------------------------------------------


def test_names_skip_the_call_parameter() -> None:
    assert ArgsSpec(typed).names == ("x", "name", "point", "items")
    assert ArgsSpec(no_args).names == ()


def test_typed_args_decode() -> None:
    spec = ArgsSpec(typed)
    got = spec.decode(enc((3, "n", {"x": 1, "y": 2}, [1, 2, 3])))
    assert tuple(got) == (3, "n", Point(1, 2), [1, 2, 3])
    assert isinstance(got[2], Point)
    # msgspec Structs encode and decode the same.
    got = spec.decode(enc((3, "n", Point(5, 6), [])))
    assert got[2] == Point(5, 6)


def test_bad_int_names_argument() -> None:
    err = bad(ArgsSpec(typed), ("three", "n", {"x": 1, "y": 2}, []))
    assert err.path == "x"
    assert str(err) == "typed() argument 'x': expected int, got str"  # Python's words


def test_bad_str_names_argument() -> None:
    err = bad(ArgsSpec(typed), (3, 4, {"x": 1, "y": 2}, []))
    assert err.path == "name"


def test_bad_struct_field_path() -> None:
    err = bad(ArgsSpec(typed), (3, "n", {"x": 1, "y": "two"}, []))
    assert err.path == "point.y"
    assert "point.y" in str(err)


def test_missing_struct_field() -> None:
    err = bad(ArgsSpec(typed), (3, "n", {"x": 1}, []))
    assert err.path == "point"
    assert "y" in str(err)


def test_bad_list_item_path() -> None:
    err = bad(ArgsSpec(typed), (3, "n", {"x": 1, "y": 2}, [1, 2, "three", 4]))
    assert err.path == "items[2]"


def test_deeply_nested_path() -> None:
    spec = ArgsSpec(nested)
    ok = spec.decode(enc(({"name": "tri", "points": [{"x": 0, "y": 0}]}, {"a": [1]})))
    assert ok[0] == Shape("tri", [Point(0, 0)])
    err = bad(spec, ({"name": "tri", "points": [{"x": 0, "y": 0}, {"x": 1, "y": None}]}, {}))
    assert err.path == "shape.points[1].y"
    err = bad(spec, ({"name": "t", "points": []}, {"k": [1, "no"]}))
    assert err.path == "table[...][1]"  # msgspec does not name the dict key


def test_optional_and_union() -> None:
    spec = ArgsSpec(optional)
    assert tuple(spec.decode(enc((None, "s")))) == (None, "s")
    assert tuple(spec.decode(enc((4, 5)))) == (4, 5)
    assert bad(spec, ("x", 5)).path == "v"
    assert bad(spec, (1, 2.5)).path == "tag"


def test_defaults_fill_missing_trailing_args() -> None:
    spec = ArgsSpec(with_defaults)
    assert tuple(spec.decode(enc((1,)))) == (1, "dflt", 1.5)
    assert tuple(spec.decode(enc((1, "b")))) == (1, "b", 1.5)
    assert tuple(spec.decode(enc((1, "b", 2.0)))) == (1, "b", 2.0)
    assert bad(spec, (1, 2)).path == "b"


@pytest.mark.parametrize("args", [(), (1, "b", 2.0, "extra")])
def test_wrong_arity_with_defaults(args: tuple[object, ...]) -> None:
    err = bad(ArgsSpec(with_defaults), args)
    assert str(err) == f"with_defaults() takes 1 to 3 arguments (a, b, c), got {len(args)}"


@pytest.mark.parametrize("args", [(), (1,), (1, "n", {"x": 1, "y": 2}), (1, "n", {}, [], 5)])
def test_wrong_arity(args: tuple[object, ...]) -> None:
    err = bad(ArgsSpec(typed), args)
    assert str(err) == f"typed() takes 4 arguments (x, name, point, items), got {len(args)}"
    assert err.path == ""


def test_no_args_handler_rejects_args() -> None:
    spec = ArgsSpec(no_args)
    assert tuple(spec.decode(enc(()))) == ()
    assert str(bad(spec, (1,))) == "no_args() takes no arguments, got 1"


def test_unannotated_params_accept_anything() -> None:
    spec = ArgsSpec(untyped)
    for v in (1, "s", None, [1, {"k": b"v"}], 2.5):
        assert tuple(spec.decode(enc((v, 1)))) == (v, 1)
    assert bad(spec, ("anything", "not an int")).path == "b"


def test_star_args_untyped() -> None:
    spec = ArgsSpec(variadic)
    assert spec.decode(enc(())) == ()
    assert spec.decode(enc((1, "a", None, [2]))) == (1, "a", None, [2])


def test_typed_then_star_args_validates_each_argument() -> None:
    spec = ArgsSpec(typed_then_variadic)
    assert spec.decode(enc((1, 2, 3))) == (1, 2, 3)
    assert spec.decode(enc((1,))) == (1,)
    err = bad(spec, ("not-int", 2))
    assert (str(err), err.path) == (
        "typed_then_variadic() argument 'a': expected int, got str",
        "a",
    )
    err = bad(spec, (1, 2, "x"))
    assert err.path == "*args[1]"
    assert str(err) == "typed_then_variadic() argument '*args[1]': expected int, got str"
    err = bad(spec, ())
    assert str(err) == "typed_then_variadic() takes at least 1 argument (a), got 0"


def star_only(*args: Any) -> None: ...


def test_a_handler_of_star_args_only_takes_any_arguments() -> None:
    # The call arrives in args[0]; every invoke argument after it.
    spec = ArgsSpec(star_only)
    assert spec.decode(enc((1, "a"))) == (1, "a")
    assert spec.decode(enc(())) == ()


def test_keyword_only_with_default_ignored() -> None:
    spec = ArgsSpec(kw_default)
    assert spec.names == ("a",)
    assert tuple(spec.decode(enc((1,)))) == (1,)
    bad(spec, (1, True))


def test_keyword_only_without_default_rejected() -> None:
    with pytest.raises(TypeError, match="keyword-only"):
        ArgsSpec(kw_required)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x94\x01\xa1"])
def test_malformed_body_is_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match="malformed"):
        ArgsSpec(typed).decode(body)


def test_body_not_an_array() -> None:
    with pytest.raises(BadRequest):
        ArgsSpec(typed).decode(enc({"x": 1}))
    with pytest.raises(BadRequest):
        ArgsSpec(variadic).decode(enc(5))


def test_memoryview_body() -> None:
    data = bytearray(b"junk" + enc((1, "n", {"x": 1, "y": 2}, [])))
    got = ArgsSpec(typed).decode(memoryview(data)[4:])
    assert got[0] == 1


def test_unresolvable_hint_falls_back_to_any() -> None:
    spec = ArgsSpec(unresolvable)
    assert tuple(spec.decode(enc((1, "whatever")))) == (1, "whatever")


def test_unresolvable_hint_keeps_other_params_typed() -> None:
    bad(ArgsSpec(unresolvable), ("not-int", "whatever"))


# -- error_info ----------------------------------------------------------


def _raise_in_helper() -> None:
    raise ValueError("boom from helper")


def test_error_info_builtin() -> None:
    try:
        _raise_in_helper()
    except ValueError as exc:
        info = error_info(exc)
    assert info.code == "remote"
    assert info.type == "ValueError"
    assert info.message == "boom from helper"
    assert "_raise_in_helper" in info.traceback
    assert "ValueError: boom from helper" in info.traceback
    assert "Traceback (most recent call last)" in info.traceback


def test_error_info_custom_types_are_qualified() -> None:
    try:
        raise Custom("c")
    except Custom as exc:
        info = error_info(exc)
    assert info.type == f"{__name__}.Custom"
    try:
        raise Outer.Inner("i")
    except Outer.Inner as exc:
        info = error_info(exc)
    assert info.type == f"{__name__}.Outer.Inner"
    assert info.message == "i"


def test_error_info_chained_traceback() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise RuntimeError("outer") from e
    except RuntimeError as exc:
        info = error_info(exc)
    assert "KeyError" in info.traceback and "RuntimeError: outer" in info.traceback


def test_error_info_round_trips_and_becomes_remote_error() -> None:
    try:
        _raise_in_helper()
    except ValueError as exc:
        info = error_info(exc)
        local_tb = "".join(traceback.format_exception(exc))
    back = codec.error_decoder.decode(codec.encoder.encode(info))
    assert back == info
    err = RemoteError(back.type, back.message, back.traceback)
    assert err.type_name == "ValueError"
    assert err.remote_message == "boom from helper"
    assert err.remote_traceback == local_tb
    assert "_raise_in_helper" in str(err)


def test_error_info_omits_defaults_on_the_wire() -> None:
    info = codec.ErrorInfo(code="no_handler", message="m")
    assert msgspec.msgpack.decode(codec.encoder.encode(info)) == {
        "code": "no_handler",
        "message": "m",
    }


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


class _BadRepr(Exception):
    def __str__(self) -> str:
        return "bad \ud800 text"


def test_error_info_never_raises_for_an_exception_whose_str_raises() -> None:
    try:
        raise _Unprintable("x")
    except _Unprintable as e:
        info = error_info(e)
    assert info.code == "remote"
    assert info.type.endswith("_Unprintable")
    assert "_Unprintable" in info.message
    codec.encoder.encode(info)  # and it encodes


def test_error_info_text_always_encodes() -> None:
    info = error_info(_BadRepr())
    assert codec.error_decoder.decode(codec.encoder.encode(info)).message == "bad ? text"


def test_error_info_without_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError as e:
        info = error_info(e, traceback=False)
        full = error_info(e)
    assert (info.type, info.message, info.traceback) == ("ValueError", "boom", "")
    assert "raise ValueError" in full.traceback


def test_an_array_reference_with_a_negative_dimension_is_a_bad_request() -> None:
    np = pytest.importorskip("numpy")

    def h(call: object, a: np.ndarray) -> None: ...

    ref = msgspec.msgpack.Ext(codec.EXT_NDARRAY, msgspec.msgpack.encode((0, "|u1", [-1])))
    body = msgspec.msgpack.encode([ref])
    with pytest.raises(BadRequest, match="negative dimension"):
        ArgsSpec(h).decode(body, [memoryview(b"x")])
