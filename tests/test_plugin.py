"""A user's tuner in a file, used from a recipe: ``imports:`` loads examples/new_tuner.py and the
engine trains, checkpoints, evaluates and reports it like a built-in tuner, all through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from utuning import plugins
from utuning.cli import main
from utuning.registry import TUNERS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "mnist5k.npz"


@pytest.fixture
def plugin_recipe(tmp_path, monkeypatch):
    if not SHARED.is_file():
        pytest.skip("shared offline data not present")
    monkeypatch.setattr(TUNERS, "_entries", dict(TUNERS._entries))  # the plugin's registration ends with the test
    monkeypatch.setattr(plugins, "_loaded", {})
    for name in ("new_tuner.py", "new_tuner.yaml"):
        shutil.copy(REPO / "examples" / name, tmp_path / name)
    return tmp_path / "new_tuner.yaml"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_plugin_tuner_runs_like_a_built_in_one(plugin_recipe, tmp_path, capsys):
    out = tmp_path / "runs" / "example_ia3"
    sets = [f"data.root={SHARED}", f"output.dir={out}"]
    assert "example_ia3" not in TUNERS
    code, _, err = run(capsys, "check", str(plugin_recipe), *sets)
    assert code == 0, err
    code, printed, err = run(capsys, "train", str(plugin_recipe), *sets)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["tuners"][0]["name"] == "example_ia3"
    saved = (out / "recipe.yaml").read_text()
    assert str(tmp_path / "new_tuner.py") in saved  # the run records its imports (absolute)
    code, printed, err = run(capsys, "eval", str(out / "recipe.yaml"), "--checkpoint", str(out))
    assert code == 0, err
    assert json.loads(printed)["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
    code, printed, err = run(capsys, "report", str(tmp_path / "runs"))
    assert code == 0 and "example_ia3" in printed


def test_a_missing_plugin_is_a_clear_error_at_load_time(plugin_recipe, tmp_path, capsys):
    out = tmp_path / "runs" / "example_ia3"
    sets = [f"data.root={SHARED}", f"output.dir={out}", "data.args.subset=64"]
    assert run(capsys, "train", str(plugin_recipe), *sets)[0] == 0
    (tmp_path / "new_tuner.py").unlink()
    TUNERS.unregister("example_ia3")
    plugins._loaded.clear()  # a fresh process: nothing imported yet
    code, _, err = run(capsys, "eval", str(out / "recipe.yaml"), "--checkpoint", str(out))
    assert code == 2 and f"plugin file '{tmp_path / 'new_tuner.py'}' does not exist" in err


def test_cli_import_option_and_unknown_tuner_without_it(plugin_recipe, tmp_path, capsys):
    bare = tmp_path / "bare.yaml"
    bare.write_text(plugin_recipe.read_text().replace("imports: [new_tuner.py]\n", ""))
    sets = [f"data.root={SHARED}"]
    code, _, err = run(capsys, "check", str(bare), *sets)
    assert code == 2 and "unknown tuner 'example_ia3'" in err
    code, _, err = run(capsys, "check", str(bare), *sets, "--import", str(tmp_path / "new_tuner.py"))
    assert code == 0, err


def test_an_installed_distribution_registers_through_its_entry_point(tmp_path, monkeypatch):
    """A pip-installed extension declares ``[project.entry-points."utuning.tuners"]``; the CLI imports
    it at start, and only it (a module of the same folder that no entry point names stays unimported)."""
    site = tmp_path / "site"
    dist = site / "my_ext-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-ext\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[utuning.tuners]\nmy_ext = my_ext_tuners\n")
    (site / "my_ext_tuners.py").write_text(
        "import utuning\n\n@utuning.register_tuner('my_ext_scale')\nclass S(utuning.Tuner):\n"
        "    '''test tuner (arXiv 2303.00690)'''\n    placement = 'parallel'\n"
        "    def forward(self, x, op):\n        return x * 0\n")
    (site / "unrelated.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(TUNERS, "_entries", dict(TUNERS._entries))
    monkeypatch.setattr(plugins, "_loaded", {})
    assert "my_ext_tuners" in plugins.load_entry_points()
    assert "my_ext_scale" in TUNERS and not (tmp_path / "imported").exists()
