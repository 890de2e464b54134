"""Built-in domains, each its own plugin (entry point) in its own folder."""
