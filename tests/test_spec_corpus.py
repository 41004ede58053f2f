"""A generated corpus of broken specs. Each must get, from ``grc validate``, exit 2 and only lines
``file:line: field.path: message`` naming the field at fault: no traceback, no hang, no memory
blow-up, within a couple of seconds, whatever its bytes.

Two generators: every leaf of a spec that sets every field (tests/specs/every-field.yaml) is made
wrong in each way its type allows (an int becomes ``true`` and 2**70, a float NaN and +-inf), and a
hand-written list covers bytes, YAML structure, ``extends``, names and rules across sections.
"""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from grc.cli import main
from grc.spec.limits import MAX_PROBLEMS, MAX_SPEC_BYTES
from grc.spec.schema import Spec
from tests.conftest import TEST_SPECS

FULL_SPEC = TEST_SPECS / "every-field.yaml"
FULL = yaml.safe_load(FULL_SPEC.read_text())
GOOD = (TEST_SPECS / "mtgr-tiny.yaml").read_text()
# file:line: field.path: message (the field path may hold a bad key verbatim, spaces included)
PROBLEM_LINE = re.compile(r"^[^\n:]+:\d+: [^\n]+?: \S.*$")
SECONDS = 2.0  # in-process validate, per spec; the "a couple of seconds"


@dataclass(frozen=True)
class Broken:
    id: str
    field: str | None  # the field path an error line must name; None: any (alias bombs break anywhere)
    write: Callable[[Path], Path]  # writes the case into a folder, returns the spec to validate
    says: str = ""  # a fragment some line must hold


def text(body: str | bytes, name: str = "bad.yaml") -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        return path

    return write


def data(value: dict[str, Any]) -> Callable[[Path], Path]:
    return text(yaml.safe_dump(value, sort_keys=False))


def edited(old: str, new: str) -> Callable[[Path], Path]:
    assert old in GOOD, f"corpus edit does not apply: {old!r}"
    return text(GOOD.replace(old, new, 1))


def full_with(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    out = copy.deepcopy(FULL)
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


# --------------------------------------------------------------------------- every leaf, made wrong
def leaves(node: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*path, key))
    elif isinstance(node, list) and node and isinstance(node[0], (dict, int, float)) and not isinstance(node[0], bool):
        for i, value in enumerate(node):
            yield from leaves(value, (*path, i))
    else:
        yield path, node


def dotted(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def wrong_values(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [("bool", True), ("2**70", 2**70), ("string", str(value))]
    if isinstance(value, float):
        return [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("bool", True)]
    return []


LEAF_CASES = [
    Broken(f"{dotted(path)}={label}", dotted(path), data(full_with(path, bad)))
    for path, value in leaves(FULL)
    for label, bad in wrong_values(value)
]


def schema_number_fields(model: type[BaseModel] = Spec, prefix: str = "") -> set[str]:
    """Every int or float field of the schema, lists and dicts as ``*``."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation, suffix = info.annotation, ""
        while True:
            origin = typing.get_origin(annotation)
            if origin in (typing.Union, types.UnionType):
                annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            elif origin is typing.Annotated:
                annotation = typing.get_args(annotation)[0]
            elif origin in (list, dict):
                annotation, suffix = typing.get_args(annotation)[-1], suffix + ".*"
            else:
                break
        if annotation in (int, float):
            out.add(path + suffix)
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out |= schema_number_fields(annotation, path + suffix + ".")
    return out


def test_the_full_spec_sets_every_number_field() -> None:
    """The leaf generator reaches every int and float of the schema (a new field joins the corpus)."""
    assert main(["validate", str(FULL_SPEC)]) == 0
    dict_fields = {"model.tables", "bundles.triton.rank_weights"}
    seen = set()
    for path, value in leaves(FULL):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts = [p if not isinstance(p, int) else "*" for p in path]
            name = ".".join(str(p) for p in parts)
            for field in dict_fields:
                if name.startswith(field + "."):
                    rest = name[len(field) + 1 :].split(".", 1)
                    name = ".".join([field, "*", *rest[1:]])
            seen.add(name)
    assert schema_number_fields() <= seen, sorted(schema_number_fields() - seen)


# --------------------------------------------------------------------------- hand-written cases
def junk_keys(count: int) -> str:
    return GOOD + "".join(f"junk_{i:06d}: {i}\n" for i in range(count))


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


def extends_to(make_target: Callable[[Path], Path], child: str = "") -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        target = make_target(folder)
        spec = folder / "child.yaml"
        spec.write_text(f"extends: {target.name}\nname: child\n{child}")
        return spec

    return write


def fifo(folder: Path) -> Path:
    path = folder / "pipe.yaml"
    os.mkfifo(path)
    return path


def directory(folder: Path) -> Path:
    path = folder / "dir.yaml"
    path.mkdir()
    return path


def symlink_loop(folder: Path) -> Path:
    path = folder / "loop.yaml"
    path.symlink_to("loop.yaml")
    return path


def extends_chain(length: int) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        (folder / "base.yaml").write_text(GOOD)
        parent = "base.yaml"
        for i in range(length):
            (folder / f"c{i}.yaml").write_text(f"extends: {parent}\n")
            parent = f"c{i}.yaml"
        return folder / parent

    return write


def extends_cycle(folder: Path) -> Path:
    (folder / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (folder / "b.yaml").write_text("extends: a.yaml\n")
    return folder / "a.yaml"


def renamed_table(name: str) -> Callable[[Path], Path]:
    return edited("    user: {vocab_size: 500}", f"    {yaml.safe_dump(name).splitlines()[0]}: {{vocab_size: 500}}")


NAMES = ["../evil", "a/b", "a b", "", "x" * 65, "é", ".hidden", "-x", "A", "a\tb"]

CASES = [
    # bytes
    Broken("non-utf8", "(file)", text(GOOD.encode().replace(b"mtgr-tiny", b"mtgr-\xff\xfe")), "not UTF-8"),
    Broken("latin1", "(file)", text(GOOD.replace("mtgr-tiny", "mtgr-tïny").encode("latin-1"))),
    Broken("nul", "(file)", text(GOOD.replace("mtgr-tiny", "mtgr\0tiny")), "U+0000"),
    Broken("bell", "(file)", text(GOOD.replace("kind: mtgr", "kind: mt\agr")), "U+0007"),
    Broken("escape", "(file)", text(GOOD + "\x1b[2J\n"), "U+001B"),
    Broken("binary", "(file)", text(bytes(range(256)) * 8)),
    Broken("too-big", "(file)", text(junk_keys(MAX_SPEC_BYTES // 16)), f"at most {MAX_SPEC_BYTES:,} bytes"),
    Broken("junk-keys", "junk_000000", text(junk_keys(4000)), "unknown key"),
    # YAML structure
    Broken("syntax", "(file)", edited("[item, category, action]", "[item, category, action"), "YAML syntax"),
    Broken("deep-flow", "(file)", text("model: " + "[" * 100_000 + "]" * 100_000 + "\n"), "nested deeper"),
    Broken("deep-block", "(file)", text("".join(f"{'  ' * i}k:\n" for i in range(200)) + "  " * 200 + "v: 1\n")),
    Broken("deep-map-flow", "(file)", text("model: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n")),
    Broken("billion-laughs", None, text(BILLION_LAUGHS), "alias bomb"),
    Broken("alias-in-itself", None, text(GOOD + "loop: &x [1, *x]\n")),
    Broken("undefined-alias", "(file)", text(GOOD + "x: *nowhere\n")),
    Broken("huge-integer", "model.d_model", edited("  d_model: 32", "  d_model: " + "9" * 5000)),
    Broken("python-tag", None, text(GOOD + "evil: !!python/object/apply:os.system ['true']\n")),
    Broken("int-key", "(top level)", text(GOOD + "1: one\n"), "keys must be strings"),
    Broken("list-key", "(top level)", text(GOOD + "? [a, b]\n: x\n"), "keys must be strings"),
    Broken("duplicate-key", "model.d_model", edited("  d_model: 32", "  d_model: 32\n  d_model: 64")),
    Broken("not-a-mapping", "(top level)", text("- a\n- b\n"), "mapping"),
    Broken("section-is-list", "model", text("name: x\nmodel: [kind, mtgr]\n")),
    Broken("number-as-string", "model.hstu.num_layers", edited("    num_layers: 3", '    num_layers: "3"')),
    # the spec path itself
    Broken("spec-missing", "(file)", lambda folder: folder / "nowhere.yaml", "file not found"),
    Broken("spec-is-directory", "(file)", directory, "a directory"),
    Broken("spec-is-fifo", "(file)", fifo, "FIFO"),
    Broken("spec-symlink-loop", "(file)", symlink_loop, "symlink loop"),
    # extends
    Broken("extends-missing", "extends", extends_to(lambda f: f / "nowhere.yaml"), "file not found"),
    Broken("extends-binary", "(file)", extends_to(text(bytes(range(256)), "bin.yaml")), "extended by"),
    Broken("extends-directory", "extends", extends_to(directory), "a directory"),
    Broken("extends-fifo", "extends", extends_to(fifo), "FIFO"),
    Broken("extends-symlink-loop", "extends", extends_to(symlink_loop), "symlink loop"),
    Broken("extends-cycle", "extends", extends_cycle, "cycle"),
    Broken("extends-self", "extends", text("extends: bad.yaml\n"), "cycle"),
    Broken("extends-chain", "extends", extends_chain(40), "extends chain"),
    Broken("extends-number", "extends", text("extends: 5\n"), "expected a file path"),
    Broken("extends-empty", "extends", text('extends: ""\n'), "expected a file path"),
    Broken("extends-nul", "extends", text('extends: "a\\0b"\n'), "expected a file path"),
    Broken("extends-huge", "extends", extends_to(text(junk_keys(MAX_SPEC_BYTES // 16), "big.yaml"))),
    # the absurd sizes, spelled as a user would
    Broken("d_model-1e12", "model.d_model", edited("  d_model: 32", "  d_model: 1e12"), "valid integer"),
    Broken("max_seq_len-2**70", "model.hstu.max_seq_len", edited("    max_seq_len: 96", f"    max_seq_len: {2**70}")),
    Broken("vocab-1e13", "model.tables.item.vocab_size", edited("{vocab_size: 2000}", "{vocab_size: 10000000000000}")),
    Broken("layers-1e6", "model.hstu.num_layers", edited("    num_layers: 3", "    num_layers: 1000000")),
    Broken(
        "time_buckets-1e9", "model.hstu.time_buckets", edited("    time_buckets: 20", "    time_buckets: 1000000000")
    ),
    Broken("num_layers-true", "model.hstu.num_layers", edited("    num_layers: 3", "    num_layers: true")),
    Broken("eps-nan", "model.hstu.eps", edited("    time_buckets: 20", "    time_buckets: 20\n    eps: .nan")),
    Broken("std-inf", "weights.init.std", edited("  init: {seed: 3}", "  init: {seed: 3, std: .inf}")),
    Broken(
        "position_buckets-past-max_seq_len",
        "model.hstu.position_buckets",
        edited("    position_buckets: 24", "    position_buckets: 200"),
    ),
    Broken(
        "blocks-too-many",
        "weights.table_block_rows",
        edited("    item: {vocab_size: 2000}", "    item: {vocab_size: 100000000}"),
        "table_block_rows",
    ),
    # rules across sections, found by validate instead of a stage
    Broken(
        "rank-weight-unknown-task",
        "bundles.triton.rank_weights.clicks",
        text(GOOD + "bundles:\n  triton:\n    rank_weights: {clicks: 1.0}\n"),
        "which model.tasks does not define",
    ),
    Broken(
        "profile-past-max_seq_len",
        "engine.profiles[0].tokens.max",
        text(GOOD + "engine:\n  profiles:\n    - tokens: {min: 2, opt: 32, max: 97}\n"),
        "exceeds model.hstu.max_seq_len",
    ),
    Broken(
        "verify-shape-too-long",
        "verify.shapes[1].history",
        edited("{users: 3, history: 40, candidates: 12}", "{users: 3, history: 90, candidates: 12}"),
    ),
    Broken(
        "verify-candidates-past-max",
        "verify.shapes[1].candidates",
        edited("{users: 3, history: 40, candidates: 12}", "{users: 3, history: 40, candidates: 30}"),
    ),
    Broken("verify-shapes-empty", "verify.shapes", text(GOOD.split("  shapes:")[0] + "  shapes: []\n"), "at least 1"),
    Broken(
        "verify-max_abs-inf", "verify.export.max_abs", edited("{max_abs: 1.0e-5, max_rel", "{max_abs: .inf, max_rel")
    ),
    Broken(
        "verify-max_abs-checks-nothing",
        "verify.export.max_abs",
        edited("{max_abs: 1.0e-5, max_rel", "{max_abs: 1.5, max_rel"),
    ),
    Broken("kernels-removed", "kernels", text("kernels: triton\n" + GOOD), "nothing read it"),
    # names that become folders, files and tensor names
    *[
        Broken(f"spec-name={n!r}", "name", edited("name: mtgr-tiny", f"name: {yaml.safe_dump(n).splitlines()[0]}"))
        for n in NAMES
    ],
    *[Broken(f"table-name={n!r}", f"model.tables.{n}", renamed_table(n)) for n in NAMES if n != "x" * 65],
    *[
        Broken(
            f"task-name={n!r}",
            "model.tasks[0]",
            edited("  head_hidden: 16", f"  head_hidden: 16\n  tasks: [{yaml.safe_dump(n).splitlines()[0]}]"),
        )
        for n in NAMES
    ],
    *[
        Broken(
            f"engine-target-name={n!r}",
            "engine.targets[0].name",
            data({**yaml.safe_load(GOOD), "engine": {"targets": [{"name": n, "sm": "sm80"}]}}),
        )
        for n in NAMES
    ],
    Broken(
        "triton-model_name",
        "bundles.triton.model_name",
        data({**yaml.safe_load(GOOD), "bundles": {"triton": {"model_name": "../x"}}}),
    ),
    Broken(
        "vllm-served_model_name",
        "bundles.vllm.served_model_name",
        data({**yaml.safe_load(GOOD), "bundles": {"vllm": {"served_model_name": "a/b"}}}),
    ),
]


def check_errors(err: str, case: Broken) -> None:
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").splitlines()
    assert lines, "exit 2 with no message"
    assert len(lines) <= MAX_PROBLEMS + 1, f"{len(lines)} lines"
    for line in lines:
        assert PROBLEM_LINE.match(line), f"not file:line: field.path: message: {line!r}"
    if case.field is not None:
        assert any(f": {case.field}: " in line for line in lines), f"no line names {case.field!r}:\n{err}"
    assert case.says in err, f"{case.says!r} not in:\n{err}"


@pytest.mark.parametrize("case", CASES + LEAF_CASES, ids=[c.id for c in CASES + LEAF_CASES])
def test_broken_spec_gets_exit_2_and_a_located_error(
    case: Broken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = case.write(tmp_path)
    started = time.perf_counter()
    code = main(["validate", str(spec)])
    seconds = time.perf_counter() - started
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    check_errors(captured.err, case)
    assert seconds < SECONDS, f"validate took {seconds:.2f}s"


def test_the_grc_command_refuses_hostile_bytes_quickly(tmp_path: Path) -> None:
    """The installed ``grc`` entry point, a fresh process: the byte and structure attacks."""
    grc = Path(sys.executable).parent / "grc"
    assert grc.is_file(), f"the grc script is not installed next to {sys.executable} (pip install -e .)"
    for case in CASES:
        if case.id not in ("non-utf8", "deep-flow", "billion-laughs", "too-big", "spec-is-fifo", "extends-fifo"):
            continue
        folder = tmp_path / case.id
        folder.mkdir()
        started = time.perf_counter()
        done = subprocess.run(
            [str(grc), "validate", str(case.write(folder))], capture_output=True, text=True, timeout=60
        )
        seconds = time.perf_counter() - started
        assert done.returncode == 2, (case.id, done.stdout, done.stderr)
        check_errors(done.stderr, case)
        assert seconds < 10, f"{case.id}: {seconds:.1f}s including interpreter start"
