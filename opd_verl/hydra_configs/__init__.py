"""Hydra configs shipped with opd_verl: the base `opd_trainer` and the `recipe` group."""
