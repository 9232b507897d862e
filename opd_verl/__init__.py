"""opd_verl: on-policy distillation objectives for veRL."""

__version__ = "0.1.0"
