"""Data in: preference and prompt datasets read from local files with `datasets`' own readers, errors naming
the file and line (`readers`), and validated, with errors naming the file, row and field (`datasets`); and
prompts, in one place: their identity and storage key, their text and token ids (`prompts`).
"""
