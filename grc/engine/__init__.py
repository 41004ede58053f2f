"""TensorRT engines for grc graphs: which toolkit builds which target, the graph conversions done
before a build, the build itself (in a subprocess, see ``worker``), and reading plans back.

Nothing here imports ``tensorrt`` or ``tensorrt_rtx`` in the calling process: every use of a
toolkit runs in ``python -m grc.engine.worker``, so a toolkit's crash (an exception escaping a
plugin callback aborts the process) fails one task instead of the build, and the environment the
toolkit needs (``LD_LIBRARY_PATH``, see ``toolkits.worker_env``) is set before it starts.
"""

# The plugin that carries grc::HSTUAttention: (op type = plugin name, plugin_version, plugin_namespace)
# as graph surgery writes them (grc/onnx/surgery/passes.py; a test checks they agree). Not imported from
# there, so the engine stage's cache key does not include the surgery passes' code.
PLUGIN = ("HSTUAttention", "1", "grc")
