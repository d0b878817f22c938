"""Pure torch, no Trainer and no I/O: sequence log-probs with a lean LM head (`logprobs`), KL estimators
(`kl`), the preference losses of DPO/RSO/IPO (`preference_losses`) and of Nash learning (`nash_losses`),
importance weights for samples not drawn from the training model (`importance`), padded batches from
token ids (`batching`), and what a wrapped model is made of (`modules`). Each function cites its equation.
"""
