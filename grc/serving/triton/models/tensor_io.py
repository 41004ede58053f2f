"""Tensors in and out of the python backend, through DLPack.

This server build (python_backend 24.10, pybind11 2.10) misreads numpy 2 arrays, silently:
``Tensor.as_numpy()`` returns zeros and ``pb_utils.Tensor(name, array)`` sends 0 bytes. DLPack
works with numpy 1 and 2. The backend renames a consumed capsule ``used_dlpack`` while numpy's
deleter expects ``used_dltensor`` (one unraisable ValueError per tensor, data intact), so the
capsule is renamed after the hand-over; the backend still owns it and calls the deleter.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import numpy as np

_USED = b"used_dltensor"
_set_capsule_name = ctypes.pythonapi.PyCapsule_SetName
_set_capsule_name.argtypes = [ctypes.py_object, ctypes.c_char_p]


def pb() -> Any:
    """The backend's utility module; only importable inside a python-backend stub."""
    import triton_python_backend_utils

    return triton_python_backend_utils


def read(request: Any, name: str) -> np.ndarray | None:
    """An input as a numpy array, or None. Zero-copy: valid until execute() returns (copy to keep it)."""
    tensor = pb().get_input_tensor_by_name(request, name)
    return None if tensor is None else np.from_dlpack(tensor)


def read_all(request: Any, names: tuple[str, ...] | list[str]) -> dict[str, np.ndarray | None]:
    """The inputs ``names`` as numpy arrays (None: not sent), as ``read`` gives them, from ONE walk over the
    request's inputs: pb_utils.get_input_tensor_by_name walks ``request.inputs()`` (a fresh list of every
    input tensor, built by pybind11) for each name, n^2 tensor objects per request."""
    sent = {tensor.name(): tensor for tensor in request.inputs()}
    return {name: None if (tensor := sent.get(name)) is None else np.from_dlpack(tensor) for name in names}


def tensor(name: str, array: np.ndarray) -> Any:
    capsule = np.ascontiguousarray(array).__dlpack__()
    out = pb().Tensor.from_dlpack(name, capsule)
    _set_capsule_name(capsule, _USED)
    return out


def response(outputs: dict[str, np.ndarray]) -> Any:
    return pb().InferenceResponse([tensor(name, array) for name, array in outputs.items()])


def error_response(message: str, invalid_argument: bool = True) -> Any:
    """An error the client sees (HTTP 400 / gRPC INVALID_ARGUMENT for a bad request, else 500)."""
    utils = pb()
    code = utils.TritonError.INVALID_ARG if invalid_argument else utils.TritonError.INTERNAL
    return utils.InferenceResponse(error=utils.TritonError(message, code))


def parameters(args: dict[str, Any]) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt (``parameters {key, value}``)."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def log(message: str) -> None:
    pb().Logger.log_warn(message)
