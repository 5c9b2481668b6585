"""One module per evaluation task (or family of tasks); each registers itself with `registry.register`."""
