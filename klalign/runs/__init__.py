"""Durable run state: nothing collected is lost or mixed with another run's data. The feedback store
(`feedback`), the run manifest (`manifest`), checksums (`integrity`), where a resumed run starts
(`resume`), seeds derived from what a draw is for (`seeding`), per-prompt jobs written as they finish
(`prompt_jobs`) and a recipe's closing summary (`reporting`).
"""
