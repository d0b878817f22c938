"""The Trainer subclasses, one per method: offline DPO/RSO/IPO (`dpo`, a `trl.DPOTrainer`); the online loop
they share (`online`); iterative DPO/RSO with its enhancers (`iterative`, `enhancers`); optimistic
KL-regularised RLHF with its reward learners (`optimistic`, `reward_learning`); Nash learning from human
feedback with its method table (`nash`, `nash_methods`).
"""
