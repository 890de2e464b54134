"""Built-in finetuners, each its own plugin (entry point) in its own folder."""
