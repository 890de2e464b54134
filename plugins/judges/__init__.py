"""Built-in judges, each its own plugin (entry point) in its own folder."""
