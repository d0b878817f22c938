"""Where feedback comes from: the reward and preference interfaces (`base`), reward functions
(`reward_functions`), sequence-classification reward models (`reward_models`), LM judges (`judges`),
pairwise preference models and the cyclic text judge (`preference_models`), and building one from a
config (`build`).
"""
