"""Generation: one sampling call (`sample.sample_completions`) over two backends, HF `generate` (`hf`)
and a colocated vLLM engine (`vllm_engine`), with their shared settings and results (`types`); and Nash-MD's
token-level geometric mixture of two models (`geometric_mixture`). Every sample is drawn from pi itself.
"""
