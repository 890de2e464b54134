"""mergeplug's built-in plugins. Each sub-package is one plugin with its own entry point; none imports another."""
