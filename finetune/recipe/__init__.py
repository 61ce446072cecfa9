"""The recipe wing, just above errors: the schema, loading YAML with locations (extends, --set), `module:function` callables, preflight checks and the generated recipe reference; torch-free."""
