"""Built-in evaluators, each its own plugin (entry point) in its own folder."""
