"""The plugin trainer (a veRL v1 trainer subclass) and its step-boundary services (preemption)."""
