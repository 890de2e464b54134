"""Built-in backends, each its own plugin (entry point) in its own folder."""
