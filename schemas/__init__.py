"""The JSON Schemas of mergeplug recipes, domains and plugin parameters (shipped as mergeplug.schemas)."""
