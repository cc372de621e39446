"""``tether types --ts``: TypeScript declarations of the channels a Main exposes to pages."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Generic, TypeVar

import pytest

from tether import cli
from tether.tstypes import load_main, typescript

APP = textwrap.dedent(
    '''
    import dataclasses, datetime
    from typing import Literal, Optional, TypedDict
    import msgspec, tether

    main = tether.Main()

    class Point(msgspec.Struct):
        """A point on the page."""
        x: int
        y: float = 0.0

    class Pair(msgspec.Struct, array_like=True):
        a: int
        b: str = ""

    class Opts(TypedDict, total=False):
        name: str
        tags: list[str]

    @dataclasses.dataclass
    class Stamp:
        when: datetime.datetime
        data: bytes

    class Odd:  # no JSON form
        pass

    @main.handle("message-from-renderer", roles={"web"})
    async def reply(call: tether.Call, message: str) -> str:
        """Answer the page.

        More text that stays out of the declaration.
        """
        return f"Received: {message}"

    @main.handle("shapes", roles=("web", "admin"))
    def shapes(
        call: tether.Call, points: list[Point], opts: Optional[Opts] = None
    ) -> dict[str, Point | None]:
        return {}

    @main.handle("stamp", roles="web")
    def stamp(call: tether.Call, pair: Pair, mode: Literal["a", "b"], *rest: int) -> Stamp:
        raise NotImplementedError

    @main.handle("loose", roles="web")
    def loose(call, x, new=1, *, flag=False):
        return x

    @main.handle("odd", roles="web")
    def odd(call: tether.Call, o: Odd, when: datetime.date) -> tuple[int, str]:
        raise NotImplementedError

    @main.handle("nothing", roles="web")
    def nothing(call: tether.Call) -> None:
        return None

    @main.handle("local-only")
    def local_only(call: tether.Call, secret: str) -> str:
        return secret

    @main.handle("admin-only", roles="admin")
    def admin_only(call: tether.Call) -> int:
        return 0

    @main.on("log", roles="web")
    def log(call: tether.Call, line: str, level: int = 0) -> None:
        pass

    class Config(TypedDict, total=False):
        """Declared out of alphabetical order."""
        timeout: int
        retries: int
        name: str

    @main.handle("set_config", roles="web")
    def set_config(call: tether.Call, cfg: Config) -> bool:
        return True

    @main.handle("upload", roles="web")
    def upload(call: tether.Call, name: str, data: bytes, extra: Optional[bytes] = None) -> bytes:
        return data

    @main.on("internal")
    def internal(call: tether.Call, n: int) -> None:
        pass
    '''
)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "tsapp.py"
    path.write_text(APP)
    return path


@pytest.fixture
def text(app: Path) -> str:
    return typescript(load_main(f"{app}:main"), source="tsapp:main")


def test_only_channels_exposed_to_pages(text: str) -> None:
    assert "local-only" not in text and "secret" not in text
    assert "admin-only" not in text
    assert "internal" not in text
    for ch in ("message-from-renderer", "shapes", "stamp", "loose", "odd", "nothing"):
        assert f'  "{ch}": [[' in text


def test_invoke_signatures_from_type_hints(text: str) -> None:
    assert '  "message-from-renderer": [[message: string], string];' in text
    assert "  /** Answer the page. */" in text
    assert "More text" not in text
    assert (
        '  "shapes": [[points: Point[], opts?: Opts | null], Record<string, Point | null>];'
    ) in text
    assert '  "stamp": [[pair: Pair, mode: "a" | "b", ...rest: number[]], Stamp];' in text
    # unannotated parameters and results; a reserved word renamed; keyword-only left out
    assert '  "loose": [[x: unknown, new_?: unknown], unknown];' in text
    # a class with no JSON form is unknown; a date is a string; a tuple a fixed array
    assert '  "odd": [[o: unknown, when: string], [number, string]];' in text
    assert '  "nothing": [[], null];' in text


def test_structs_typeddicts_dataclasses_become_declarations(text: str) -> None:
    assert (
        "/** A point on the page. */\nexport interface Point {\n  x: number;\n  y?: number;\n}"
        in (text)
    )
    assert "export interface Opts {\n  name?: string;\n  tags?: string[];\n}" in text
    # the JSON encoding: datetime and bytes are strings (ISO 8601, base64); bytes one way only
    assert "// (A page can receive bytes, as base64, but not send them" in text
    assert "export interface Stamp {\n  when: string;\n  data: string;\n}" in text
    # an array_like Struct is an array; a field with a default may be left out
    assert "export type Pair = [number, string?];" in text


def test_events_and_the_channels_map_of_tether_d_ts(text: str) -> None:
    assert ('export interface WebEvents {\n  "log": [line: string, level?: number];\n}') in text
    # merged into tether.d.ts's Channels, through which Session.invoke is typed
    assert text.endswith(
        'declare module "/tether.js" {\n'
        "  interface Channels extends WebChannels {}\n"
        "  interface Events extends WebEvents {}\n"
        "  interface InvokeWithOnly extends WebAmbiguous {}\n"
        "}\n"
    )


def test_typeddict_fields_in_declared_order(text: str) -> None:
    assert (
        "export interface Config {\n  timeout?: number;\n  retries?: number;\n  name?: string;\n}"
    ) in text


def test_bytes_arguments_are_never_and_bytes_results_base64(text: str) -> None:
    """A page cannot send bytes (the server refuses the string), so no call type-checks."""
    assert (
        "  // a bytes argument is `never`: a page cannot send bytes\n"
        '  "upload": [[name: string, data: never, extra?: never | null], string];'
    ) in text


def test_channels_whose_last_argument_may_be_options_need_invoke_with(text: str) -> None:
    """invoke() takes a last {timeout}/{signal}-only object for its options: such channels
    are listed in WebAmbiguous, which tether.d.ts's invoke refuses (invokeWith is typed)."""
    block = text.split("export interface WebAmbiguous {\n", 1)[1].split("\n}", 1)[0]
    # Config has a timeout field; "loose" takes anything; the others cannot be options
    assert block.splitlines() == ['  "loose": true;', '  "set_config": true;']


def test_tether_d_ts_types_send_and_refuses_ambiguous_invokes() -> None:
    from importlib import resources

    dts = (resources.files("tether.web") / "static" / "tether.d.ts").read_text()
    assert "export interface Events {}" in dts and "export interface InvokeWithOnly {}" in dts
    assert "send<C extends string>(channel: C, ...args: EventArgs<C>): void;" in dts
    assert "C extends keyof InvokeWithOnly\n  ? [use_invokeWith_for_this_channel: never]" in dts


def test_load_main_names_the_file_of_a_missing_attribute(app: Path) -> None:
    with pytest.raises(AttributeError) as info:
        load_main(f"{app}:nosuch")
    assert str(info.value) == f"{app} has no attribute 'nosuch'"
    assert "_tether_types_" not in str(info.value)
    with pytest.raises(AttributeError, match=r":main has no attribute 'deeper'"):
        load_main(f"{app}:main.deeper")


def test_tether_d_ts_has_the_channels_map_it_augments() -> None:
    """The augmentation names what tether.d.ts declares: Channels, as [arguments, result]."""
    from importlib import resources

    dts = (resources.files("tether.web") / "static" / "tether.d.ts").read_text()
    assert "export interface Channels {}" in dts
    assert "Channels[C] extends [infer A extends unknown[], unknown]" in dts
    assert "Channels[C] extends [unknown[], infer R]" in dts


def test_no_web_channels_gives_empty_maps() -> None:
    import tether

    main = tether.Main()
    main.handle("x", lambda call: 1)
    text = typescript(main)
    assert "export interface WebChannels {}" in text
    assert "export interface WebEvents {}" in text


def _strip_strings(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


# One top-level TypeScript declaration, or a member line inside one.
_DECL = re.compile(
    r"^(export (interface [A-Za-z_$][\w$]* (\{\}|\{)|type [A-Za-z_$][\w$]* = .+;)"
    r'|declare module "" \{)$'
)
_MEMBER = re.compile(r'^  (""|[A-Za-z_$][\w$]*\??): .+;$|^  interface \w+ extends \w+ \{\}$')


def test_output_is_well_formed(text: str) -> None:
    """A structural check (tsc is not required): balanced brackets, known line shapes."""
    code = _strip_strings(text)
    pairs = {")": "(", "]": "[", "}": "{", ">": "<"}
    stack: list[str] = []
    for ch in code.replace("=>", "  "):
        if ch in "([{<":
            stack.append(ch)
        elif ch in pairs:
            assert stack and stack.pop() == pairs[ch], code
    assert not stack
    depth = 0
    for line in code.splitlines():
        if not line.strip():
            continue
        if depth == 0:
            assert _DECL.match(line), line
        elif line.startswith("  ") and not line.startswith("   "):
            assert _MEMBER.match(line), line
        depth += line.count("{") - line.count("}")
    assert depth == 0


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_output_brackets_balance_under_node(
    app: Path, tmp_path: Path, child_env: dict[str, str]
) -> None:
    """Node reads the file and checks that its brackets nest (strings and comments skipped)."""
    out = tmp_path / "channels.d.ts"
    env = dict(child_env)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(cli.__file__).parent.parent), env["PYTHONPATH"]])
    subprocess.run(
        [sys.executable, "-m", "tether", "types", "--ts", f"{app}:main", "-o", str(out)],
        check=True,
        timeout=60,
        env=env,
    )
    script = textwrap.dedent(
        r"""
        const src = require("fs").readFileSync(process.argv[1], "utf8")
          .replace(/\/\*[\s\S]*?\*\//g, "").replace(/\/\/.*$/gm, "")
          .replace(/"(?:[^"\\]|\\.)*"/g, '""').replace(/=>/g, "  ");
        const open = "([{<", close = ")]}>", stack = [];
        let nested = true;
        for (const c of src) {
          if (open.includes(c)) stack.push(c);
          else if (close.includes(c) && stack.pop() !== open[close.indexOf(c)]) nested = false;
        }
        const decls = (src.match(/^export (interface|type) \w+/gm) || [])
          .map((d) => d.split(" ")[2]);
        console.log(JSON.stringify({ balanced: nested && stack.length === 0, decls }));
        """
    )
    done = subprocess.run(
        ["node", "-e", script, str(out)], timeout=30, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == {
        "balanced": True,
        "decls": [
            *("Config", "Opts", "Pair", "Point", "Stamp"),
            *("WebChannels", "WebEvents", "WebAmbiguous"),
        ],
    }


def test_cli_writes_file(app: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "channels.d.ts"
    assert cli.main(["types", "--ts", f"{app}:main", "-o", str(out)]) == cli.EXIT_OK
    assert '"message-from-renderer": [[message: string], string];' in out.read_text()
    assert cli.main(["types", "--ts", f"{app}:main"]) == cli.EXIT_OK
    assert "export interface WebChannels {" in capsys.readouterr().out


def test_cli_dotted_module_from_current_directory(
    app: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(app.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "tsapp", raising=False)
    assert cli.main(["types", "--ts", "tsapp:main"]) == cli.EXIT_OK
    assert "// Generated by `tether types --ts tsapp:main`" in capsys.readouterr().out
    sys.modules.pop("tsapp", None)


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("tsapp", "expected MODULE:ATTR"),
        ("{app}:nope", "has no attribute 'nope'"),
        ("{app}:Point", "not a tether.Main"),
        ("/no/such/file.py:main", "no such file"),
        ("no_such_module_xyz:main", "No module named"),
    ],
)
def test_cli_bad_target(
    app: Path, target: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["types", "--ts", target.format(app=app)]) == cli.EXIT_USAGE
    assert error in capsys.readouterr().err


def test_electron_style_example_types() -> None:
    """The example's page gets its two channels, and nothing main keeps to itself."""
    example = Path(__file__).resolve().parent.parent / "examples" / "electron_style" / "main.py"
    text = typescript(load_main(f"{example}:main"))
    assert '  "message-from-renderer": [[message: string], string];' in text
    assert '  "page-ready": [];' in text


T = TypeVar("T")  # module level: Box's string annotation `T` must resolve


def test_same_named_and_generic_types_get_distinct_names() -> None:
    import msgspec

    import tether

    class Box(msgspec.Struct, Generic[T]):
        v: T

    def one() -> type:
        class Item(msgspec.Struct):
            a: int

        return Item

    def two() -> type:
        class Item(msgspec.Struct):
            b: str

        return Item

    first, second = one(), two()
    main = tether.Main()
    main.handle("boxes", lambda call, x: None, roles="web")
    main.registry.invokes["boxes"].fn.__annotations__ = {"x": Box[int], "return": Box[str]}
    main.handle("items", lambda call, x: None, roles="web")
    main.registry.invokes["items"].fn.__annotations__ = {"x": first, "return": second}
    text = typescript(main)
    assert '  "boxes": [[x: Box_int_], Box_str_];' in text
    assert "export interface Box_int_ {\n  v: number;\n}" in text
    # two classes named Item: the page gets Item and Item_2
    assert '  "items": [[x: Item], Item_2];' in text
    assert "export interface Item {\n  a: number;\n}" in text
    assert "export interface Item_2 {\n  b: string;\n}" in text
