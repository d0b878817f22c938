"""Every error that means bad input, in one place: a config, a dataset, an oracle's answer, a checkpoint
to evaluate, collected data from another run, a resume that cannot go on; and a run that diverged.

Recipes and `klalign evaluate` report these as one line on stderr with exit status 2
(`klalign.config.checks.run_recipe`); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the field (or the config file)."""


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file (or label), and the row and field where relevant."""


class OracleError(ValueError):
    """An oracle returned something unusable (wrong count, NaN, infinity, out of range)."""


class EvaluationError(ValueError):
    """A checkpoint, tokenizer or setting that cannot be evaluated; the message names it."""


class RunMismatchError(ValueError):
    """Collected data that belongs to another run (or to other settings); the message names the differences."""


class ResumeError(RuntimeError):
    """A resume that cannot go on safely; the message names the file and what to do."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss, gradient or KL; the message names the round and the step."""


# The errors reported as one line (bad input, a diverged run), not as a bug (with its traceback).
INPUT_ERRORS = (ConfigError, DataError, EvaluationError, OracleError, RunMismatchError, ResumeError, FileNotFoundError,
                DivergenceError)  # a diverged run is reported the same way: one line, exit status 2
