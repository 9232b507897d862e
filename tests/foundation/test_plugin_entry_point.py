"""veRL discovers the plugin through its `verl.plugins` entry point, and a failed registration is reported loudly
(veRL itself logs plugin failures only at DEBUG)."""

import json
import os
import subprocess
import sys

SNAPSHOT = """
import json
import verl  # loads entry points; nothing from opd_verl is imported explicitly before the snapshot
from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY
from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
present = {"adv_estimator": sorted(ADV_ESTIMATOR_REGISTRY), "distillation_loss": sorted(DISTILLATION_LOSS_REGISTRY)}
from opd_verl.integration.registry import REGISTERED_NAMES
print(json.dumps({"present": present, "ours": REGISTERED_NAMES}))
"""


def _run(code: str, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=full_env)


def test_entry_point_registers_every_name_in_verl_registries():
    out = _run(SNAPSHOT, VERL_USE_EXTERNAL_PLUGINS="opd_verl")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["ours"]) == {"adv_estimator", "distillation_loss"}
    for kind, names in result["ours"].items():
        assert names, kind
        missing = set(names) - set(result["present"][kind])
        assert not missing, f"{kind}: {sorted(missing)} not registered through the entry point"


def test_without_the_entry_point_nothing_is_registered():
    # The control for the test above: with plugin discovery off, veRL's registries lack the names.
    out = _run(SNAPSHOT, VERL_USE_EXTERNAL_PLUGINS="none")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for kind, names in result["ours"].items():
        assert not set(names) & set(result["present"][kind]), kind


def test_failed_registration_is_reported_on_stderr():
    code = """
from verl.trainer.ppo import core_algos
core_algos.ADV_ESTIMATOR_REGISTRY["opd_pipeline"] = lambda **kwargs: None  # a foreign estimator under our name
import opd_verl.integration.plugin
"""
    out = _run(code, VERL_USE_EXTERNAL_PLUGINS="none")
    assert out.returncode != 0
    assert "opd_verl: registering the plugin in veRL failed" in out.stderr
    assert "opd_pipeline" in out.stderr


def test_entry_point_lets_verl_build_models_beside_trl():
    # TRL 1.x (the test extra) has no value-head model; veRL's model patching would import it and fail.
    code = """
import sys
import verl
from verl.models.transformers import monkey_patch
print(monkey_patch.is_trl_available(), "trl" in sys.modules)
"""
    out = _run(code, VERL_USE_EXTERNAL_PLUGINS="opd_verl")
    assert out.returncode == 0, out.stderr[-3000:]
    from opd_verl.integration.trl_compat import trl_has_value_head

    # TRL is a test oracle: loading the plugin neither imports it nor triggers its experimental-import warning.
    assert out.stdout.strip().splitlines()[-1] == f"{trl_has_value_head()} False"
    assert "TRLExperimentalWarning" not in out.stderr


def test_value_head_check_agrees_with_importing_trl():
    # Oracle: import the class the way veRL does (trl.experimental.ppo, then trl) in a fresh interpreter.
    code = """
try:
    try:
        from trl.experimental.ppo import AutoModelForCausalLMWithValueHead
    except ImportError:
        from trl import AutoModelForCausalLMWithValueHead
    print(True)
except ImportError:
    print(False)
"""
    out = _run(code, TRL_EXPERIMENTAL_SILENCE="1")
    assert out.returncode == 0, out.stderr[-3000:]
    from opd_verl.integration.trl_compat import trl_has_value_head

    assert out.stdout.strip().splitlines()[-1] == str(trl_has_value_head())


def test_value_head_check_reads_both_export_sites(tmp_path, monkeypatch):
    from opd_verl.integration import trl_compat

    (tmp_path / "experimental" / "ppo").mkdir(parents=True)
    (tmp_path / "__init__.py").write_text("from .trainer import SFTTrainer\n")
    monkeypatch.setattr(trl_compat, "_trl_dir", lambda: str(tmp_path))
    assert not trl_compat.trl_has_value_head()
    (tmp_path / "experimental" / "ppo" / "__init__.py").write_text(
        "from .modeling_value_head import AutoModelForCausalLMWithValueHead\n"
    )
    assert trl_compat.trl_has_value_head()
    (tmp_path / "experimental" / "ppo" / "__init__.py").unlink()
    (tmp_path / "__init__.py").write_text('_import_structure = {"models": ["AutoModelForCausalLMWithValueHead"]}\n')
    assert trl_compat.trl_has_value_head()
