"""The vllm bundle stage and the request encoding, without vLLM (fast, CI)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from grc.deploy import vllm as dv
from grc.serving.vllm import env as vllm_env
from grc.serving.vllm.plugin import tokens as tk
from grc.spec.loader import load_spec
from grc.spec.schema import VllmBundleConfig
from grc.stages.vllm_bundle import limits
from grc.weights import load_model, open_tables
from tests.conftest import run_build, write_spec


def _bundle(built: tuple[Path, Path], name: str = "hstu-tiny") -> Path:
    return built[1] / name / "bundles" / "vllm"


def test_layout_and_hard_linked_weights(built_tiny: tuple[Path, Path]) -> None:
    folder = _bundle(built_tiny)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "bundle.json",
        "manifest.json",
        "model/config.json",
        "model/dense.json",
        "model/manifest.json",
        "model/model-00001-of-00001.safetensors",
        "model/model.safetensors.index.json",
        "plugin/grc_vllm_plugin/__init__.py",
        "plugin/pyproject.toml",
        "sample_request.json",
    ]
    weights = built_tiny[1] / "hstu-tiny" / "weights"
    shard = "model-00001-of-00001.safetensors"
    assert (folder / "model" / shard).stat().st_ino == (weights / shard).stat().st_ino  # a hard link, not a copy
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["weights"] == ["hardlink"]
    assert manifest["sha256"] == {
        f"model/{shard}": json.loads((weights / "manifest.json").read_text())["shards"][0]["sha256"]
    }


def test_config_json_names_grc_architecture(built_tiny: tuple[Path, Path]) -> None:
    spec = load_spec(built_tiny[0]).spec
    config = json.loads((_bundle(built_tiny) / "model" / "config.json").read_text())
    assert config["architectures"] == ["GrcRankingModel"]
    assert config["model_type"] == "grc"
    assert config["dtype"] == "float32"
    assert config["grc_model"] == spec.model.model_dump(mode="json")
    assert config["max_position_embeddings"] == tk.Layout.of(spec.model).max_prompt_len()


def test_plugin_package_installs_with_its_entry_point(built_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    # pip builds in the folder it installs (build/, *.egg-info): install a copy, the shared bundle stays as built
    # (the real-vLLM tests check that serving leaves it untouched, and found this test's leftovers there)
    plugin = Path(shutil.copytree(_bundle(built_tiny) / "plugin", tmp_path / "plugin"))
    pyproject = (plugin / "pyproject.toml").read_text()
    assert '[project.entry-points."vllm.general_plugins"]\ngrc = "grc_vllm_plugin:register"' in pyproject
    assert "dependencies = []" in pyproject
    assert "from grc.serving.vllm.plugin import register" in (plugin / "grc_vllm_plugin" / "__init__.py").read_text()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(tmp_path / "site"),
            str(plugin),
        ],
        check=True,
        capture_output=True,
    )
    [dist] = (tmp_path / "site").glob("grc_vllm_plugin-*.dist-info")
    assert "[vllm.general_plugins]\ngrc = grc_vllm_plugin:register" in (dist / "entry_points.txt").read_text()


def test_bundle_json_server_flags_and_sample(built_tiny: tuple[Path, Path]) -> None:
    spec = load_spec(built_tiny[0]).spec
    folder = _bundle(built_tiny)
    d = json.loads((folder / "bundle.json").read_text())
    args = d["server"]["args"]
    for flag in (
        "--runner",
        "--skip-tokenizer-init",
        "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching",
        "--enforce-eager",
    ):
        assert flag in args
    assert args[args.index("--runner") + 1] == "pooling"
    assert args[args.index("--max-num-seqs") + 1] == str(spec.bundles.vllm.max_num_seqs)
    assert d["server"]["module"] == "vllm.entrypoints.openai.api_server"
    layout = tk.Layout.of(spec.model)
    assert d["limits"]["max_model_len"] == layout.max_prompt_len() == 213
    sample = {k: np.asarray(v) for k, v in d["sample"]["arrays"].items()}
    assert d["sample"]["prompt"] == tk.encode(layout, sample)
    body = json.loads((folder / "sample_request.json").read_text())
    assert body == {"model": "hstu-tiny", "task": "token_classify", "input": d["sample"]["prompt"]}
    assert d["tokens"]["magic"] == tk.MAGIC and d["tokens"]["errors"]["4"].startswith("an id")
    assert (np.diff(sample["history_timestamps"]) >= 0).all(), "the sample's events are not oldest first"
    lim = d["limits"]
    assert (lim["max_users_per_request"], lim["max_history"]) == (16, 48)
    assert lim["timestamps"] == {"min": -(2**61), "max": 2**61 - 1, "unit": "seconds"}
    readme = " ".join((folder / "README.md").read_text().split())
    assert "at most 16 users (prompts) in one /pooling request" in readme and "1..48 history events" in readme
    assert "starts the server on a free port" in readme and "prints the endpoint and this curl line" in readme
    config = json.loads((folder / "model" / "config.json").read_text())
    assert config["grc_max_users_per_request"] == 16


@pytest.mark.parametrize("which", ["built_tiny", "built_mtgr_tiny"])
def test_encoding_round_trip_gives_the_pytorch_scores(which: str, request: pytest.FixtureRequest) -> None:
    """encode -> decode -> Batch is lossless: the same GRModel gives bit-identical scores (cross features,
    int64 timestamps and profile ids included: mtgr-tiny has all of them)."""
    built = request.getfixturevalue(which)
    spec = load_spec(built[0]).spec
    weights = built[1] / spec.name / "weights"
    model, tables = load_model(spec.model, weights), open_tables(spec.model, weights)
    layout = tk.Layout.of(spec.model)
    batch = tk.sample_batch(spec.model, 6, 40, 12, seed=5)
    prompts = [tk.encode(layout, tk.user_arrays(batch, u, layout)) for u in range(6)]
    assert all(0 <= t < 2**31 for p in prompts for t in p)
    assert [len(p) for p in prompts] == [
        layout.length(int(h), int(c))
        for h, c in zip(batch.history_offsets.diff(), batch.candidate_offsets.diff(), strict=True)
    ]
    decoded = [tk.decode(layout, np.asarray(p, np.int32)) for p in prompts]  # vLLM's ids are int32
    for u, d in enumerate(decoded):  # lossless, with the generated events put oldest first (user_arrays)
        events = slice(int(batch.history_offsets[u]), int(batch.history_offsets[u + 1]))
        order = np.argsort(batch.history_time[events].numpy(), kind="stable")
        np.testing.assert_array_equal(d.history_time, batch.history_time[events].numpy()[order])
        batch.history_time[events] = torch.from_numpy(d.history_time)
        for t in layout.history:
            np.testing.assert_array_equal(d.history[t], batch.history[t][events].numpy()[order])
            batch.history[t][events] = torch.from_numpy(d.history[t])
    with torch.no_grad():
        assert torch.equal(model(tk.batch_of(decoded), tables), model(batch, tables))


def test_reference_scores_do_not_depend_on_the_batch(built_mtgr_tiny: tuple[Path, Path]) -> None:
    """The PyTorch reference every vLLM answer is checked against (``deploy.vllm.Reference``) scores a prompt
    the same alone or in a jagged batch with others (the vLLM model itself: test_vllm_model_step.py)."""
    reference = dv.Reference(_bundle(built_mtgr_tiny, "mtgr-tiny"))
    prompts = dv.random_prompts(_bundle(built_mtgr_tiny, "mtgr-tiny"), 8, seed=2)
    together = reference.scores(prompts)
    for i in (0, 3, 7):
        alone = reference.scores([prompts[i]])[0]
        np.testing.assert_allclose(together[i], alone, rtol=0, atol=1e-12)
    shuffled = reference.scores(prompts[::-1])[::-1]
    for a, b in zip(together, shuffled, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_bad_prompts_are_refused_with_a_code(built_mtgr_tiny: tuple[Path, Path]) -> None:
    spec = load_spec(built_mtgr_tiny[0]).spec
    layout = tk.Layout.of(spec.model)
    good = dv.random_prompts(_bundle(built_mtgr_tiny, "mtgr-tiny"), 1, seed=3)[0]
    h, c = good[1], good[2]

    def code(prompt: list[int]) -> int:
        with pytest.raises(tk.RequestError) as err:
            tk.decode(layout, np.asarray(prompt))
        return err.value.code

    assert code([1, 2, 3]) == 1
    assert code([7, *good[1:]]) == 1
    assert code(good[:-1]) == 2
    assert code([good[0], h, layout.max_candidates + 1, *good[3:]]) == 3
    assert code([good[0], 0, c, *good[3:]]) == 3
    bad_id = list(good)
    bad_id[tk.HEADER] = spec.model.tables["user"].vocab_size  # profile user id, one past the table
    assert code(bad_id) == 4
    assert code([*good[:-1], -1]) == 5
    nan = list(good)
    cross_at = layout.candidate_start(h) + c * len(layout.candidate)
    nan[cross_at : cross_at + 2] = [0x7FC0, 0]  # float32 NaN bits
    assert code(nan) == 6
    rng = np.random.default_rng(0)
    for _ in range(300):  # garbage of every length: a RequestError, never an IndexError or worse
        junk = rng.integers(0, 2**31, rng.integers(0, 60)).tolist()
        if junk and rng.random() < 0.7:
            junk[0] = tk.MAGIC
        if len(junk) > 2:
            junk[1:3] = rng.integers(0, 8, 2).tolist()
        with contextlib.suppress(tk.RequestError):
            tk.decode(layout, np.asarray(junk, np.int64))


def test_long_history_keeps_the_newest_events_whatever_the_candidates(built_tiny: tuple[Path, Path]) -> None:
    """The Triton bundle's rule: max_history (48) newest events by time, in request order, for any c."""
    spec = load_spec(built_tiny[0]).spec
    layout = tk.Layout.of(spec.model)
    assert layout.max_history() == 48
    batch = tk.sample_batch(spec.model, 1, 63, 16, seed=1)
    arrays = tk.user_arrays(batch, 0, layout)
    order = np.random.default_rng(0).permutation(96)
    arrays = {k: (np.concatenate([v, v + 7])[order] if k.startswith("history") else v) for k, v in arrays.items()}
    arrays["history_item"] %= spec.model.tables["item"].vocab_size
    arrays["history_action"] %= spec.model.tables["action"].vocab_size
    newest = np.sort(np.argsort(arrays["history_timestamps"], kind="stable")[-48:])
    for c in (1, 16):
        decoded = tk.decode(layout, np.asarray(tk.encode(layout, {**arrays, "candidate_item": np.arange(c) % 8})))
        np.testing.assert_array_equal(decoded.history_time, arrays["history_timestamps"][newest])
        np.testing.assert_array_equal(decoded.history["item"], arrays["history_item"][newest])
    with pytest.raises(tk.RequestError, match="history too long: 96 events; the model keeps at most 48"):
        tk.encode(layout, arrays, truncate=False)


@pytest.mark.parametrize(("name", "value"), [("request_time", 2**61), ("history_timestamps", -(2**61) - 1)])
def test_timestamps_outside_the_range_are_refused_naming_the_field(
    built_tiny: tuple[Path, Path], name: str, value: int
) -> None:
    spec = load_spec(built_tiny[0]).spec
    layout = tk.Layout.of(spec.model)
    arrays = tk.user_arrays(tk.sample_batch(spec.model, 1, 8, 4, seed=1), 0, layout)
    arrays[name] = arrays[name].copy()
    arrays[name][0] = value
    with pytest.raises(tk.RequestError, match=rf"{name}: timestamp {value} is outside the accepted range"):
        tk.encode(layout, arrays)
    arrays[name][0] = value - 1 if value > 0 else value + 1  # the edge itself: carried exactly
    assert tk.decode(layout, np.asarray(tk.encode(layout, arrays))).request_time == arrays["request_time"][0]


def test_spec_rules_name_their_field() -> None:
    with pytest.raises(ValidationError, match=r"mode: retrieval \(next-item generation\)"):
        VllmBundleConfig(mode="retrieval")
    with pytest.raises(ValidationError, match="max_num_batched_tokens: must be >= max_model_len 512"):
        VllmBundleConfig(max_model_len=512, max_num_batched_tokens=256)
    with pytest.raises(ValidationError, match="extra_args: --enable-chunked-prefill breaks"):
        VllmBundleConfig(extra_args=["--enable-chunked-prefill"])
    with pytest.raises(ValidationError):
        VllmBundleConfig(dtype="int8")  # type: ignore[arg-type]


def test_limits_default_to_the_longest_request(built_tiny: tuple[Path, Path], tmp_path: Path) -> None:
    spec = load_spec(built_tiny[0]).spec
    assert limits(spec) == {
        "max_model_len": 213,  # 5 header tokens + 48 events x 4 + 16 candidates (history room kept for 16)
        "max_num_batched_tokens": 8192,
        "longest_request": 213,
        "max_num_seqs": 16,
    }
    from grc.errors import StageError

    small = spec.model_copy(
        update={"bundles": spec.bundles.model_copy(update={"vllm": VllmBundleConfig(max_num_batched_tokens=100)})}
    )
    with pytest.raises(StageError, match=r"bundles\.vllm\.max_num_batched_tokens: must be >= max_model_len 213"):
        limits(small)


def test_editing_bundles_vllm_reruns_only_the_vllm_stage(tiny_copy: tuple[Path, Path]) -> None:
    spec, artifacts = tiny_copy
    write_spec(spec.parent, spec, {"bundles.vllm.max_num_seqs": 4, "bundles.vllm.served_model_name": "ranker"})
    statuses = run_build(spec)
    assert statuses.pop("vllm") == "built"
    assert all(status == "up to date" for status in statuses.values()), statuses
    d = json.loads((artifacts / "hstu-tiny" / "bundles" / "vllm" / "bundle.json").read_text())
    args = d["server"]["args"]
    assert args[args.index("--max-num-seqs") + 1] == "4" and args[args.index("--served-model-name") + 1] == "ranker"


def test_stage_module_imports_light() -> None:
    # (grc.stages imports every stage; onnx comes from others' stage modules, torch must come from none)
    code = (
        "import sys, grc.stages.vllm_bundle; print([m for m in ('torch', 'vllm', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_venv_error_names_the_command(tmp_path: Path) -> None:
    assert vllm_env.find_venv(tmp_path / "none") is None
    with pytest.raises(vllm_env.VllmEnvError, match=r"-m grc.serving.vllm.env --venv .*none"):
        vllm_env.ensure(tmp_path / "none", allow_create=False)


def test_the_venv_module_names_the_checkout_it_lives_in() -> None:
    """From a checkout the venv's processes get REPO on PYTHONPATH: REPO must be this checkout's root, wherever
    env.py sits in grc/ (it moved from grc/serving/ to grc/serving/vllm/)."""
    root = Path(__file__).resolve().parents[2]
    assert root == vllm_env.REPO
    assert vllm_env.FROM_CHECKOUT
    assert vllm_env.grc_environ({})["PYTHONPATH"] == str(root)


def test_deploy_without_a_bundle_says_how_to_build(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, Path(__file__).resolve().parents[2] / "specs" / "hstu-tiny.yaml")
    loaded = load_spec(spec)
    with pytest.raises(dv.DeployError, match=r"no vllm bundle at .*: build it first"):
        dv.bundle_dir(loaded, tmp_path / "artifacts" / "hstu-tiny")


def test_a_venv_that_cannot_be_made_fails_the_tests_instead_of_skipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: a VllmEnvError (grc's own installer) skipped the whole real-vLLM suite."""
    from tests.vllm.conftest import require_vllm_venv

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv(vllm_env.ENV_VAR, str(tmp_path / "a-file" / "venv"))  # cannot be made: its parent is a file
    monkeypatch.delenv("GRC_VLLM_CREATE", raising=False)
    with pytest.raises(vllm_env.VllmEnvError, match="could not make the vLLM venv"):
        require_vllm_venv()


def test_the_vllm_bundle_is_keyed_by_the_spec_name(tmp_path: Path) -> None:
    """The bundle writes spec.name (the default served model name, the metadata): a renamed spec must not be
    handed the other name's bundle by the build cache, so the stage's key changes with the name."""
    from grc.build.graph import fingerprint
    from grc.stages import stage_named

    base = Path(__file__).resolve().parents[2] / "specs" / "hstu-tiny.yaml"
    first = load_spec(write_spec(tmp_path, base, name="first.yaml"))
    renamed = load_spec(write_spec(tmp_path, base, {"name": "renamed"}, name="renamed.yaml"))
    vllm = stage_named("vllm")
    assert fingerprint(vllm, first) != fingerprint(vllm, renamed)
    assert fingerprint(stage_named("weights"), first) == fingerprint(stage_named("weights"), renamed)
