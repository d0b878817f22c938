"""`klalign evaluate`: the KL/reward trade-off of checkpoints (`evaluate`), the models it compares, found and
checked before sampling (`checkpoints`), its statistics with standard errors (`statistics`) and the files
it writes: CSV, JSON, a Markdown table and a plot (`report`).
"""
