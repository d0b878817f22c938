"""Run a recipe with a stale view of the feedback store on rank 1 (a shared filesystem with attribute caching):
its `FeedbackStore.chunk` and `round_rows` see nothing. Used by tests/test_distributed.py.

    accelerate launch ... tests/scripts/stale_store_run.py recipes/iterative_dpo.py --config ... (recipe args)
"""

import os
import runpy
import sys

from klalign.runs.feedback import FeedbackStore

if os.environ.get("RANK") == "1":
    FeedbackStore.chunk = lambda self, round_index, chunk_index: None
    FeedbackStore.round_rows = lambda self, round_index: []

recipe = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(recipe, run_name="__main__")
