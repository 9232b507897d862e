"""`HealthMonitor.maybe_plot`: when `diagnostics.png` is written, and that it is a PNG of the four panels."""

from omegaconf import OmegaConf

from opd_verl.config import parse_opd_section
from opd_verl.trainer.health_monitor import HealthMonitor


def _monitor(tmp_path, plot_every):
    import os

    import opd_verl

    base = OmegaConf.load(os.path.join(os.path.dirname(opd_verl.__file__), "hydra_configs", "opd_trainer.yaml")).opd
    base.teachers.models.default.path = "/t"
    base.health.plot_every = plot_every
    opd = parse_opd_section(OmegaConf.to_container(base, resolve=True))
    return HealthMonitor(opd.health, opd, 1.0, str(tmp_path))


def _history(n):
    return [
        {
            "step": s,
            "discrepancy": [0.1 * k - s for k in range(10)],
            "advantage": [0.2] * 10,
            "release_points": [0.5, 1.0, 0.25],
        }
        for s in range(1, n + 1)
    ]


def test_plot_every_and_last_step(tmp_path):
    m = _monitor(tmp_path, plot_every=2)
    assert m.maybe_plot(1, last=False) is None  # no step recorded yet
    m.history = _history(3)
    assert m.maybe_plot(3, last=False) is None
    path = m.maybe_plot(2, last=False)
    assert path == str(tmp_path / "diagnostics.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "diagnostics.png").unlink()
    assert _monitor(tmp_path, plot_every=0).maybe_plot(3, last=False) is None
    m0 = _monitor(tmp_path, plot_every=0)
    m0.history = _history(3)
    assert m0.maybe_plot(3, last=False) is None and m0.maybe_plot(3, last=True) is not None
