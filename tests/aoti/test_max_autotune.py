"""engine.aoti.max_autotune: GPU packages compile with Inductor's max-autotune (GEMM templates that can take the
pointwise epilogues, coordinate-descent tuning of the pointwise kernels). On the CPU: the options reach Inductor
(this torch has every one of them), nothing changes without the field, and the spec carries it. Its speed: the
device (bench/e2e.py's aoti_bf16_autotune mode, bench/results/e2e-notes.md)."""

from __future__ import annotations

import torch._inductor.config as inductor_config

from grc.aoti.build import INDUCTOR_CONFIGS, MAX_AUTOTUNE_CONFIGS, inductor_configs
from grc.spec.loader import load_spec
from tests.conftest import TEST_SPECS


def test_max_autotune_adds_its_options_and_only_then() -> None:
    plain = inductor_configs({"grc.target": "cuda"})
    tuned = inductor_configs({"grc.target": "cuda"}, max_autotune=True)
    # every option exists in this torch (inductor_configs drops the ones it lacks: a rename would drop them silently)
    assert all(hasattr(inductor_config, k) for k in MAX_AUTOTUNE_CONFIGS)
    assert {k: tuned[k] for k in MAX_AUTOTUNE_CONFIGS} == MAX_AUTOTUNE_CONFIGS
    assert not set(MAX_AUTOTUNE_CONFIGS) & set(plain)
    assert {k: v for k, v in tuned.items() if k not in MAX_AUTOTUNE_CONFIGS} == plain
    assert "CPP" not in tuned["max_autotune_gemm_backends"]  # GPU packages only
    assert all(plain[k] == v for k, v in INDUCTOR_CONFIGS.items() if k in plain)


def test_the_spec_field_is_off_by_default_and_read_from_yaml(tmp_path) -> None:
    base = load_spec(TEST_SPECS / "mtgr-tiny.yaml").spec
    assert base.engine.aoti.max_autotune is False
    path = tmp_path / "tuned.yaml"
    path.write_text(f"extends: {TEST_SPECS / 'mtgr-tiny.yaml'}\nname: tuned\nengine: {{aoti: {{max_autotune: true}}}}\n")
    assert load_spec(path).spec.engine.aoti.max_autotune is True
