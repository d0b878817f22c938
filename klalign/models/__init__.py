"""Models: loading policies, references and reward models from folders, GGUF files, PEFT adapters or tiny
configs (`loading`, `tiny`); where models live under DDP and DeepSpeed (`placement`); the reference policy,
a frozen model or the disabled adapter (`reference`); snapshots of the trainable parameters (`snapshots`).
"""
