import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra


@pytest.fixture
def compose_cfg():
    """Compose opd_verl's config (veRL's ppo_trainer + opd section) with Hydra overrides, as main.py does."""

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="opd_verl.hydra_configs", version_base=None):
            return compose(config_name="opd_trainer", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()
