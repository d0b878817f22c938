"""`klalign evaluate`: the KL/reward trade-off of checkpoints (`evaluate`), its statistics with standard
errors (`statistics`) and the files it writes: CSV, JSON, a Markdown table and a plot (`report`).
"""
