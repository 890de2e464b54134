"""Built-in plugins of this kind: one sub-package each, one entry point each (see pyproject.toml)."""
