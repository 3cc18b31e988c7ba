"""A stage-2 DDP step with NCCL where there are fewer GPUs than processes: does the process group start, do the
ranks' gradients average, do their weights stay equal? Launch it with torchrun:

    torchrun --standalone --nproc_per_node 2 bench/ddp_gpu.py [--student-model ViT-B-16]

Each rank takes GPU local_rank mod the GPUs there (training's own set-up gives each rank its own GPU, which one GPU
cannot), builds the student (random weights, the same seed on every rank), wraps it in DistributedDataParallel and
takes training's `kd_step` on its own synthetic batch and teacher features. Rank 0 prints whether the trainable
weights are equal on every rank afterwards (they must be: DDP averaged the gradients) and the step's time. A NCCL
that refuses two ranks on one GPU fails here with its own message: that is the answer to "can it start there".
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import build_student
from training.distill import DistillConfig, kd_step
from training.loss import KDObjective
from training.runtime import Runtime, grad_scaler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student-model", default="ViT-B-16", help="open_clip architecture of the student")
    parser.add_argument("--feature-dim", type=int, default=768, help="teacher feature width")
    parser.add_argument("--batch", type=int, default=8, help="images per rank")
    parser.add_argument("--backend", default="nccl", help="process group backend (gloo for a CPU check)")
    args = parser.parse_args()

    local_rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.backend == "nccl"
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, timeout=timedelta(minutes=5))
    rt = Runtime(dist.get_rank(), world, local_rank, device, True)
    torch.manual_seed(0)
    student, pre = build_student(args.student_model, None, args.feature_dim, 4, 9)
    student.to(device)
    model = DistributedDataParallel(student, device_ids=[device.index] if cuda else None)
    defaults = DistillConfig.__dataclass_fields__
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=defaults["lr"].default,
                                momentum=defaults["momentum"].default)
    vectors = torch.nn.functional.normalize(torch.randn(100, args.feature_dim, device=device), dim=-1)
    objective = KDObjective(vectors, 100.0, defaults["kd_weight"].default, defaults["temperature"].default)
    torch.manual_seed(1 + rt.rank)  # each rank its own batch, as a distributed sampler gives
    images = torch.randn(args.batch, 3, pre.image_size, pre.image_size, device=device)
    teacher = torch.randn(args.batch, args.feature_dim, device=device)
    student.train()
    student.tower.visual.eval()
    started = time.perf_counter()
    loss = kd_step(model, images, teacher, objective, optimizer, grad_scaler(rt, "fp32"), rt, "fp32")
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    flat = torch.cat([p.detach().flatten() for p in student.parameters() if p.requires_grad])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rt.rank == 0:
        spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
        print(f"{world} ranks, backend {args.backend}, devices {device if not cuda else 'GPU ' + str(device.index)} "
              f"x{world}: one kd_step in {seconds * 1000:.0f} ms, loss {float(loss):.4f}, weights equal across ranks: "
              f"{'yes' if spread == 0 else f'no (max difference {spread:.2e})'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
