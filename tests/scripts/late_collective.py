"""A run whose last collective is still finishing when `main()` returns: rank 0 joins it 3 s late, and on
rank 1 a Python callback on its future (run by gloo's worker thread, so it needs the GIL) is pending when
main() drops the DDP model. Ending the group inside main() (as the recipes' `end_training()` did) made the
DDP reducer the group's last owner, and freeing it joined gloo's threads with the GIL held: rank 1 hung in
`~ProcessGroupGloo`, its peer gone. Under `run_recipe` it exits cleanly."""

import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  imported before the group exists, as in the recipes (holds no reference)
from torch.nn.parallel import DistributedDataParallel

from klalign.config.checks import run_recipe


def main():
    dist.init_process_group("gloo")
    model = DistributedDataParallel(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()
    if dist.get_rank() == 0:
        time.sleep(3)
    work = dist.all_reduce(torch.ones(1), async_op=True)
    work.get_future().then(lambda future: future.value())
    if len(sys.argv) > 1 and sys.argv[1] == "end-group-in-main":  # the old recipes' order: hangs rank 1
        dist.destroy_process_group()


if __name__ == "__main__":
    run_recipe(main)
    print("closed", flush=True)
