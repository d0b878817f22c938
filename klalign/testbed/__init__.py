"""Test beds whose answers are known: the single-token bed, a real HF causal LM whose policy is an exact
table, with its tables, oracles and closed forms (`bandit`), its model and tokenizer (`model`,
`closed_actions`) and exact metrics (`metrics`); and the tiny positivity task (`positivity`).
"""
