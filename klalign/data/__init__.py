"""Data in: preference and prompt datasets read from local files and validated, with errors naming the
file, row and field (`datasets`); and prompts, in one place: their identity and storage key, their text
and token ids (`prompts`).
"""
