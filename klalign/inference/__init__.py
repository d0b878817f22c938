"""Data producers at inference time: best-of-N sampling with its reward/KL curve (`best_of_n_sampling`)
and RSO's statistical rejection sampling from the tilted optimum (`rejection_sampling`).
"""
