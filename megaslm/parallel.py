"""Process groups: distributed init, megatron-core parallel state, and DeepSpeed's view of them.

One object (``ParallelLayout``) owns the parallel degrees and checks them against the world size
(torchtitan's pattern); ``initialize`` builds megatron-core's TP/PP/DP groups from it and seeds the
RNGs; ``DeepSpeedMpu`` is the adapter DeepSpeed needs to see TP/PP (without it, DeepSpeed treats
tensor-parallel ranks as data-parallel replicas and TP trains silently wrong).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megaslm import cpu_compat
from megaslm.config import ConfigError, RunConfig
# the rendezvous port and the environment's rank / world size (torch-free there); callers also take them from here
from megaslm.ports import env_world, free_port  # noqa: F401


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tensor: int
    pipeline: int
    data: int
    virtual_pipeline: Optional[int] = None

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    @classmethod
    def from_config(cls, cfg: RunConfig, world_size: int) -> "ParallelLayout":
        cfg.validate(world_size=world_size)
        p = cfg.parallel
        return cls(p.tensor, p.pipeline, cfg.data_parallel_size(world_size), p.virtual_pipeline)

    def coordinates(self) -> List[Dict[str, int]]:
        """Rank -> (tp, pp, dp) as megatron-core orders them (tp fastest, then dp, then pp)."""
        out = []
        for rank in range(self.world_size):
            tp = rank % self.tensor
            dp = (rank // self.tensor) % self.data
            pp = rank // (self.tensor * self.data)
            out.append({"rank": rank, "tp": tp, "pp": pp, "dp": dp})
        return out


def init_distributed(timeout_s: int = 600) -> Dict[str, int]:
    """Create the default process group: NCCL with CUDA, gloo without. Idempotent."""
    w = env_world()
    if dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "local_rank": w["local_rank"]}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(w["local_rank"] % torch.cuda.device_count())
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        # a single process started without a launcher: its rendezvous is private, so take a free
        # port instead of torch's 29500 (which another run on a shared node may hold)
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    # DeepSpeed's engine insists on these even for a single process started without a launcher
    for k, v in (("RANK", w["rank"]), ("WORLD_SIZE", w["world_size"]), ("LOCAL_RANK", w["local_rank"])):
        os.environ.setdefault(k, str(v))
    try:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=w["rank"],
            world_size=w["world_size"],
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (RuntimeError, OSError) as e:  # torch's DistNetworkError / DistStoreError are RuntimeErrors
        text = str(e)
        if "EADDRINUSE" in text or "address already in use" in text.lower() or "errno: 98" in text.lower():
            raise RendezvousPortError(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) from None
        raise
    return w


class RendezvousPortError(ConfigError):
    """The rendezvous (MASTER_PORT) is taken by another process on this node."""

    def __init__(self, addr: str, port: str):
        super().__init__(
            f"rendezvous port {port} on {addr} is already in use (another run on this node?): choose a free one "
            f"with `deepspeed --master_port N ...` or `torchrun --master-port N ...`, or MASTER_PORT=N for a "
            f"single process (README: Training)")


def initialize(cfg: RunConfig) -> ParallelLayout:
    """Distributed init + megatron-core parallel state + seeds. Config is validated first."""
    world = env_world()
    layout = ParallelLayout.from_config(cfg, world["world_size"])  # raises ConfigError before any group
    if not torch.cuda.is_available():
        cpu_compat.apply()
    init_distributed()
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor,
        pipeline_model_parallel_size=layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
    )
    set_seed(cfg.seed)
    return layout


def set_seed(seed: int) -> None:
    """Same seed on every rank for the host RNGs; megatron's tracker gives TP regions per-rank seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.model_parallel_manual_seed(seed)


def destroy() -> None:
    """Orderly teardown: every rank reaches this point (barrier), then megatron's groups, then the
    default group. A process that exits with the groups still up can abort in a C++ destructor while
    its peer is still talking to it ("terminate called without an active exception", exit 250)."""
    from megatron.core import parallel_state as ps

    if dist.is_initialized():
        dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMpu:
    """What DeepSpeed asks of an ``mpu``, answered from megatron-core's parallel state.

    DeepSpeed calls it ``model parallel``; with pipeline parallelism that must be the combined
    TP x PP group (grad-norm for clipping is reduced over it, and checkpoint shard names come from
    its rank: a TP-only group makes both pipeline stages write ``mp_rank_00``).
    """

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    # model parallel = TP x PP
    def get_model_parallel_rank(self):
        return self.ps.get_model_parallel_group().rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_model_parallel_group().size()

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()
