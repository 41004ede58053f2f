"""What a serialized plan says without a GPU (deserializing one needs a CUDA driver).

TensorRT-RTX plans are undocumented: ``vtrt`` magic, a bitmask of target SMs at byte 0x20 (each bit
checked by building one engine per SM), and the embedded compiler text that names ONNX layers and
plugin ("custom") layers. Good for a CPU-side check that the plugin layers reached the plan and for
which SMs it was built; anything more needs ``grc inspect engine`` on a GPU.
"""

from __future__ import annotations

import re
from typing import Any

RTX_MAGIC = b"vtrt"
SM_BITS = {0x01: 75, 0x02: 80, 0x04: 86, 0x08: 89, 0x10: 120, 0x20: 121}


def describe(blob: bytes) -> dict[str, Any]:
    text = blob.decode("latin-1")
    out: dict[str, Any] = {"bytes": len(blob), "magic": blob[:4].decode("latin-1", "replace")}
    if blob[:4] == RTX_MAGIC and len(blob) > 0x20:
        mask = blob[0x20]
        out["sm_mask"] = mask
        out["target_sms"] = [sm for bit, sm in SM_BITS.items() if mask & bit]
    out["custom_layers"] = sorted(set(re.findall(r'custom_layer=\{ name="([^"]+)"', text)))
    out["plugin_buffers"] = len(set(re.findall(r'name="([^"]+)_pluginType"', text)))
    out["onnx_layers"] = len(set(re.findall(r"\[ONNX Layer: ([^\]]+)\]", text)))
    out["embedded_plugin_library"] = b"getCreators" in blob
    return out
