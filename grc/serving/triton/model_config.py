"""Triton ``config.pbtxt`` from typed data: the ModelConfig protobuf message that tritonclient ships.

Building the message and printing it with protobuf's text_format means every field name, enum and
nesting is checked by the schema instead of by eye in a string template; parsing goes through the
same schema, so a typo in a hand-written config is reported with its line and column.
protobuf cannot express a few rules Triton enforces at load time; ``config_problems`` checks those
so they fail here, before a server is started.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from grc.errors import GrcError

ModelConfig = pb.ModelConfig
ModelInput = pb.ModelInput
ModelOutput = pb.ModelOutput
CONFIG_FILENAME = "config.pbtxt"
CUSTOM_CONFIGS = "configs"  # <model>/configs/<name>.pbtxt: loaded instead under --model-config-name=<name>
_WIRE_ALIASES = {"BYTES": "STRING"}


class ModelConfigError(GrcError):
    """A config.pbtxt that does not parse, or that Triton would refuse to load."""

    exit_code = 2


def data_type(name: str) -> int:
    """``"FP32"`` or ``"TYPE_FP32"`` -> the DataType enum value; raises on an unknown name.

    ``"BYTES"`` (the name on the wire and in tritonclient) means the config's TYPE_STRING.
    """
    name = _WIRE_ALIASES.get(name, name)
    key = name if name.startswith("TYPE_") else f"TYPE_{name}"
    try:
        return int(pb.DataType.Value(key))
    except ValueError as exc:
        names = [value.name for value in pb.DataType.DESCRIPTOR.values if value.name != "TYPE_INVALID"]
        known = ", ".join(name.removeprefix("TYPE_") for name in names)
        raise ModelConfigError(f"unknown Triton data type {name!r}; known: {known}") from exc


def tensor_input(name: str, dtype: str, dims: Sequence[int]) -> pb.ModelInput:
    return pb.ModelInput(name=name, data_type=data_type(dtype), dims=list(dims))


def tensor_output(name: str, dtype: str, dims: Sequence[int]) -> pb.ModelOutput:
    return pb.ModelOutput(name=name, data_type=data_type(dtype), dims=list(dims))


def render_config(msg: pb.ModelConfig) -> str:
    """The config.pbtxt text of ``msg``; raises ModelConfigError if Triton would refuse it."""
    _raise_problems(config_problems(msg), f"model config {msg.name or '<unnamed>'}")
    return text_format.MessageToString(msg)


def write_config(model_dir: Path, msg: pb.ModelConfig, custom: str | None = None) -> Path:
    """Render ``msg`` into ``model_dir/config.pbtxt`` (directory created), or, for a ``custom``
    name, into ``model_dir/configs/<custom>.pbtxt``: what ``tritonserver --model-config-name=<custom>``
    loads instead (models without that file keep config.pbtxt). Returns the file."""
    path = model_dir / CONFIG_FILENAME if custom is None else model_dir / CUSTOM_CONFIGS / f"{custom}.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_config(msg))
    return path


def parse_config(text: str, source: str = "<config>") -> pb.ModelConfig:
    """Parse config.pbtxt text; errors carry ``source:line:column``."""
    msg = pb.ModelConfig()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{source}:{exc}") from exc
    _raise_problems(config_problems(msg), source)
    return msg


def load_config(path: Path) -> pb.ModelConfig:
    """Parse and check ``path`` (a config.pbtxt, or a model directory holding one)."""
    path = path / CONFIG_FILENAME if path.is_dir() else path
    msg = parse_config(path.read_text(), str(path))
    # Triton requires a config's name to match its model directory; say so before the server does.
    model_dir = path.parent.parent if path.parent.name == CUSTOM_CONFIGS else path.parent
    if msg.name and msg.name != model_dir.name:
        raise ModelConfigError(f"{path}: name {msg.name!r} differs from its model directory {model_dir.name!r}")
    return msg


def _raise_problems(problems: list[str], where: str) -> None:
    if problems:
        raise ModelConfigError("\n".join(f"{where}: {problem}" for problem in problems))


# --------------------------------------------------------------------------- checks


def config_problems(msg: pb.ModelConfig) -> list[str]:
    """Rules Triton enforces at load time that the protobuf schema alone does not."""
    problems: list[str] = []
    if not msg.backend and not msg.platform:
        problems.append("set backend (e.g. python) or platform (e.g. ensemble)")
    problems += _tensor_problems("input", msg.input)
    problems += _tensor_problems("output", msg.output)
    if msg.HasField("dynamic_batching") and msg.max_batch_size <= 0:
        problems.append("dynamic_batching needs max_batch_size > 0")
    if msg.platform == "ensemble":
        problems += _ensemble_problems(msg)
    return problems


def _tensor_problems(kind: str, tensors: Iterable[pb.ModelInput | pb.ModelOutput]) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for tensor in tensors:
        label = f"{kind} {tensor.name or '<unnamed>'}"
        if not tensor.name:
            problems.append(f"{label}: name is empty")
        elif tensor.name in seen:
            problems.append(f"{label}: declared twice")
        seen.add(tensor.name)
        if tensor.data_type == pb.TYPE_INVALID:
            problems.append(f"{label}: data_type is not set")
        if not tensor.dims and not tensor.HasField("reshape"):
            problems.append(f"{label}: dims is empty")
        if any(d < -1 or d == 0 for d in tensor.dims):
            problems.append(f"{label}: dims {list(tensor.dims)} must be positive or -1")
    return problems


def _ensemble_problems(msg: pb.ModelConfig) -> list[str]:
    # Each step may only read ensemble inputs or tensors an earlier step wrote, and every
    # ensemble output must be written by some step: Triton checks the same at load.
    steps = msg.ensemble_scheduling.step
    if not steps:
        return ["ensemble has no ensemble_scheduling.step"]
    problems: list[str] = []
    available = {tensor.name for tensor in msg.input}
    for index, step in enumerate(steps):
        label = f"ensemble step {index} ({step.model_name or '<no model_name>'})"
        if not step.model_name:
            problems.append(f"{label}: model_name is empty")
        for model_input, tensor in step.input_map.items():
            if tensor not in available:
                problems.append(f"{label}: input {model_input} reads {tensor!r}, which nothing before it produces")
        available.update(step.output_map.values())
    for tensor in msg.output:
        if tensor.name not in available:
            problems.append(f"ensemble output {tensor.name} is written by no step")
    return problems
