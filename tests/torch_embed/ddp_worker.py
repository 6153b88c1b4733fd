"""One rank of the DDP top-k hook checks, launched by test_torch_ddp.py:
``python ddp_worker.py RANK WORLD PORT MODE OUT``.

``equal``: a one-parameter model (its bucket is its gradient) runs 5 steps under the hook with
fixed weights; each rank saves its local gradients and the hook's averaged ones.
``train``: a small regression MLP trains 150 SGD steps under the hook, then without it; each
rank saves both runs' losses and the hook run's final parameters."""

import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from moecore.compress import TopK
from moecore.integrations.torch import TopKHookState, topk_hook


def equal(rank, out):
    torch.manual_seed(0)
    model = torch.nn.Linear(40, 25, bias=False)
    ddp = DistributedDataParallel(model)
    compressor = TopK(0.05, method="exact", warmup_steps=1, warmup_start=0.25)
    state = TopKHookState(compressor, dense_steps=1)
    ddp.register_comm_hook(state, topk_hook)
    rng = np.random.default_rng(100 + rank)
    local, averaged = [], []
    for _ in range(5):
        x = torch.from_numpy(rng.standard_normal((8, 40), dtype=np.float32))
        model.zero_grad()
        model(x).pow(2).sum().backward()  # no DDP: this rank's own gradient
        local.append(model.weight.grad.reshape(-1).clone().numpy())
        ddp.zero_grad()
        ddp(x).pow(2).sum().backward()
        averaged.append(model.weight.grad.reshape(-1).clone().numpy())
    np.savez(out, local=np.stack(local), averaged=np.stack(averaged), bytes_sent=state.bytes_sent)


def _train(rank, hook):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    ddp = DistributedDataParallel(model)
    if hook:
        ddp.register_comm_hook(TopKHookState(TopK(0.1, warmup_steps=5), dense_steps=2), topk_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(7)
    w_true = torch.randn(16, 1, generator=gen)
    x_all = torch.randn(512, 16, generator=gen)
    y_all = torch.tanh(x_all @ w_true)
    x, y = x_all[rank::2], y_all[rank::2]  # each rank its half of the data
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train(rank, out):
    losses, params = _train(rank, hook=True)
    dense_losses, _ = _train(rank, hook=False)
    np.savez(out, losses=losses, params=params.numpy(), dense_losses=dense_losses)


if __name__ == "__main__":
    rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    {"equal": equal, "train": train}[mode](rank, out)
    # Both ranks done before either tears gloo down: a rank that destroyed the group while
    # its peer was still finishing once died in gloo's teardown ("terminate called without
    # an active exception", exit -6) after writing its results.
    dist.barrier()
    dist.destroy_process_group()
