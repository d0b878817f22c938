"""The learning-rate schedule of the online trainers, as long as the run whatever each round trains on.

A round's number of optimizer steps is known only once its feedback is in (iterative DPO drops ties and
trains on every round so far; the count grows round by round), so a schedule sized from an estimate ends
early or late: with linear decay sized for every collected pair, a run that trains on half of them stops
at half the decay. Here the schedule's clock is the run's progress in rounds: round r spans schedule steps
[r S, (r + 1) S) with S = `STEPS_PER_ROUND`, and its n optimizer steps advance the clock evenly, the last
one landing on (r + 1) S. Every transformers schedule (linear, cosine, warmup as a fraction of the run)
then reaches its end at the last optimizer step of the last round, and a resumed run continues from the
round boundary its checkpoint holds.
"""

from __future__ import annotations

STEPS_PER_ROUND = 1000  # the schedule's resolution within a round


def schedule_length(num_rounds: int) -> int:
    """The number of steps the scheduler is built for (`num_training_steps`)."""
    return num_rounds * STEPS_PER_ROUND


class RoundClock:
    """Where the schedule should be after each optimizer step of a round."""

    def __init__(self):
        self.round_index, self.num_steps, self.taken = 0, 1, 0

    def begin(self, round_index: int, num_steps: int) -> None:
        """A round that will take `num_steps` optimizer steps (at least 1 is assumed)."""
        self.round_index, self.num_steps, self.taken = round_index, max(1, num_steps), 0

    def start(self) -> int:
        return self.round_index * STEPS_PER_ROUND

    def after_step(self) -> int:
        """The schedule position after the next optimizer step (a step past the announced count stays at the
        round's end)."""
        self.taken += 1
        fraction = min(self.taken, self.num_steps) / self.num_steps
        return self.start() + round(fraction * STEPS_PER_ROUND)

    def end(self) -> int:
        return (self.round_index + 1) * STEPS_PER_ROUND


def advance(scheduler, position: int) -> None:
    """Step `scheduler` until its clock (`last_epoch`, torch's public counter) reaches `position`."""
    while scheduler.last_epoch < position:
        scheduler.step()
