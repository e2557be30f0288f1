"""The checkpoint recovery system: discover -> plan (pure) -> verify -> restore, plus manifests and the report."""
