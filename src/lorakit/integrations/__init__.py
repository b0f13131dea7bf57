"""Backends and frameworks lorakit plugs into (each imported lazily; optional extras)."""
