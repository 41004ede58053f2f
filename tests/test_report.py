"""The README's measured figures are generated from bench/results (bench/report.py), and every result
file says where it came from."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[1]
PROVENANCE = ("argv", "commit", "dirty", "source_sha256", "date", "device", "versions")


def test_readme_agrees_with_the_results(capsys: pytest.CaptureFixture[str]) -> None:
    rc = report.main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_an_edited_number_in_the_readme_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (REPO / "README.md").read_text()
    block = next(report.BLOCK.finditer(readme))
    number = re.search(r"\d+\.\d+", block["body"])
    assert number is not None, f"block {block['name']} holds no decimal number to edit"
    start = block.start("body") + number.start()
    changed = str(float(number[0]) + 1)
    edited = readme[:start] + changed + readme[start + len(number[0]) :]
    (tmp_path / "README.md").write_text(edited)

    assert report.main(["--check", "--readme", str(tmp_path / "README.md")]) == 1
    err = capsys.readouterr().err
    assert f"report block '{block['name']}' disagrees" in err
    diff = err.splitlines()
    assert any(line.startswith("-") and changed in line for line in diff)  # the README's line ...
    assert any(line.startswith("+") and number[0] in line for line in diff)  # ... and what the JSON gives
    assert (tmp_path / "README.md").read_text() == edited  # --check writes nothing


def test_a_changed_result_fails_the_check_and_regenerating_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results)
    build = json.loads((results / "build.json").read_text())
    build["rows"][0]["full_s"] = 12345.0
    (results / "build.json").write_text(json.dumps(build))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    args = ["--readme", str(tmp_path / "README.md"), "--results", str(results)]

    assert report.main(["--check", *args]) == 1
    assert "report block 'build' disagrees" in capsys.readouterr().err
    assert report.main(args) == 0
    assert "12,345 s" in (tmp_path / "README.md").read_text()
    assert report.main(["--check", *args]) == 0


def test_a_removed_block_is_an_error(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    block = next(m for m in report.BLOCK.finditer(readme) if m["name"] == "cache")
    (tmp_path / "README.md").write_text(readme[: block.start()] + readme[block.end() :])
    with pytest.raises(SystemExit, match=r"missing \['cache'\]"):
        report.main(["--check", "--readme", str(tmp_path / "README.md")])


@pytest.mark.parametrize("path", sorted((REPO / "bench" / "results").glob("*.json")), ids=lambda p: p.name)
def test_every_result_file_carries_its_provenance(path: Path) -> None:
    data = json.loads(path.read_text())
    if data.get("provenance") == "legacy":
        assert len(data.get("known", "")) > 40, f"{path.name}: legacy without saying what is known"
    else:
        missing = [k for k in PROVENANCE if k not in data]
        assert not missing, f"{path.name}: no {missing}: write it with bench/_common.write_result"
        # the program: a script's path, or a module run as one (runpy, python -m: bench/gpu_run_arena_diag.sh)
        assert data["argv"] and (data["argv"][0].endswith(".py") or data["argv"][0].startswith("bench."))


@pytest.mark.parametrize(
    ("name", "edit", "block"),
    [
        ("quant.json", lambda d: d["precisions"]["int8"]["worst_over_tasks"].update(kendall_tau=0.5), "quant"),
        ("history-cache-cpu.json", lambda d: d["cases"][0].update(speedup=99.0), "history-cache"),
        ("history-cache-cpu-delta10.json", lambda d: d["cases"][0].update(speedup=99.0), "history-cache"),
        ("history-cache-served-cpu.json", lambda d: d["cases"][0].update(hits_counted=1.0), "history-cache-served"),
    ],
)
def test_each_result_file_a_block_quotes_drives_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, edit: Any, block: str
) -> None:
    results = tmp_path / "results"
    shutil.copytree(REPO / "bench" / "results", results)
    data = json.loads((results / name).read_text())
    edit(data)
    (results / name).write_text(json.dumps(data))
    assert report.main(["--check", "--results", str(results)]) == 1
    assert f"report block '{block}' disagrees" in capsys.readouterr().err


def test_the_tables_share_agrees_with_every_parameter_the_spec_declares() -> None:
    """table-share counts through parameter_summary; all_params lists each parameter block by block."""
    from grc.model.params import all_params
    from grc.spec.loader import load_spec

    block = report.table_share_block(report.Results(REPO / "bench" / "results"))
    for spec in report.SHARE_SPECS:
        loaded = load_spec(REPO / "specs" / f"{spec}.yaml")
        params = all_params(loaded.spec.model, loaded.spec.weights.table_block_rows)
        share = 100 * sum(p.numel for p in params if p.kind == "embedding") / sum(p.numel for p in params)
        assert f"| `{spec}` | {share:.1f}% |" in block


def test_a_served_run_names_the_bundle_it_served() -> None:
    """Two served runs of one spec can differ only by the bundle's batching or instances (session 6's one and
    two instances): bench/serve.py records them and the report prints them; a run without them prints none."""
    from bench import serve
    from grc.spec.loader import load_spec

    data = json.loads((REPO / "bench/results/serve-h200-mtgr-small-gpu.json").read_text())
    for recorded in data["specs"].values():
        recorded.pop("served", None)  # a run from before bench/serve.py recorded it
    assert report.served_configs(data) == ""
    spec = load_spec(REPO / "specs/mtgr-small-gpu.yaml").spec
    data["specs"]["mtgr-small-gpu"]["served"] = serve.served_config(spec)
    line = report.served_configs(data)
    count = spec.bundles.triton.instance_count
    assert f"aotinductor on KIND_GPU, {count} instance(s), max batch 32" in line
    assert line in report.serve_table("serve-h200-mtgr-small-gpu.json", data)
