"""Configs: one YAML file whose keys map 1:1 onto dataclass fields, plus CLI overrides (`parsing`), and the
checks every trainer, recipe and tool runs before any model loads, with the one way a recipe reports bad
input (`checks`).
"""
