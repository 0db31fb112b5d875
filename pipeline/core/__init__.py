"""The bottom layer: error types, repository paths, the strict YAML loader, model definitions and hardware profiles.

Nothing here imports another layer of the package, nor anything heavy (PyYAML only).
"""
