"""The `teacher` stage: train a denoiser network with EDM's preconditioning and DSM loss
(log-normal noise levels ln t ~ N(P_mean, P_std^2), weight (t^2 + sigma_data^2) / (t sigma_data)^2)
on the data of [data]; writes ``teacher.pt`` (EMA weights) for ``[teacher] kind = "network"``."""

from __future__ import annotations

import time

import torch

from core.base import distributed as dist
from core.diffusion.dsm import DSMLoss, dsm_per_sample
from core.diffusion.edm import EDMDenoiser, add_noise
from core.host.config import result_values
from core.base.errors import UserError
from core.base.io import save_torch
from core.host.plugins import create_network
from core.train.loop import (EMA, LRSchedule, TrainingLoop, backward, config_digest,
                           iteration_generator, make_optimizer, plot_curves,
                           with_lr_schedule)

FORMAT = "ctmkit.teacher"      # the file the network teacher (plugins/teachers/network.py) reads


def fingerprint(cfg, data_fingerprint: str) -> str:
    """What the teacher's weights depend on: the network, the data, the [teacher_train] keys
    that change a result (core.host.config) and sigma_data; a checkpoint of another is not resumed."""
    tt = cfg.teacher_train
    return config_digest({"network": cfg.network.data, "data": data_fingerprint,
                          "train": with_lr_schedule(result_values(tt), tt),
                          "sigma_data": cfg.diffusion.sigma_data})


def train_teacher(run) -> None:
    cfg, tt, diff = run.cfg, run.cfg.teacher_train, run.cfg.diffusion
    world, device = dist.world(), run.device
    sl = dist.local_slice(tt.batch_size, f"{cfg.path}: [teacher_train]")
    source = run.data_source()
    if source is None:
        raise UserError(f"{cfg.path}: the 'teacher' stage needs a [data] section "
                        f"(path = \"x0.npy\" or gmm = {{...}})")
    shape, num_classes = tuple(source.load().shape), source.num_classes
    name = cfg.network.data.get("name", "mlp")
    options = {k: v for k, v in cfg.network.data.items() if k != "name"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tt.seed)
        net = create_network(name, options, run.ctx, shape, num_classes, False,
                             str(cfg.path)).to(device)
    ema = EMA(net, tt.ema[0])
    opt = make_optimizer(tt.optimizer, net.parameters(), tt.lr)
    model = net if world == 1 else torch.nn.parallel.DistributedDataParallel(net)
    denoise = EDMDenoiser(model, diff.sigma_data)
    loss = DSMLoss(tt.p_mean, tt.p_std)
    fp = fingerprint(cfg, source.fingerprint())
    loop = TrainingLoop("teacher", ckdir=run.out_dir / "teacher_checkpoints", fingerprint=fp,
                        modules={"net": net, "ema": ema.model}, optimizer=opt,
                        params=list(net.parameters()), ema_source=net, emas=[ema],
                        lr=LRSchedule.of(tt),
                        warmup=tt.warmup, grad_clip=tt.grad_clip, iterations=tt.iterations,
                        checkpoint_every=tt.checkpoint_every,
                        keep_checkpoints=tt.keep_checkpoints,
                        metrics=run.out_dir / "teacher_metrics.csv", fields=["loss_dsm", "lr"],
                        progress=run.progress)
    t0 = time.perf_counter()
    for it in loop.iterations():
        gen = iteration_generator(tt.seed, it, stream=1)
        x0, labels = source.sample(tt.batch_size, gen)
        x0 = x0.float()
        draws = {k: v[sl] for k, v in loss.draw(gen, x0).items()}
        x0 = x0[sl].to(device)
        labels = labels[sl].to(device) if labels is not None else None
        sigma = draws["sigma"].to(device)
        D = denoise(add_noise(x0, sigma, draws["z"].to(device)), sigma.float(), labels)
        l = dsm_per_sample(D, x0, sigma, diff.sigma_data).mean()
        red = dist.all_reduce_sum(l.detach().double().reshape(1)) / world   # no sync
        loop.check_finite(red, it)
        opt.zero_grad(set_to_none=True)
        backward(l)
        lr = loop.step(it)
        done = it + 1
        if loop.due(done, tt.log_every):
            loop.log_row(done, {"loss_dsm": float(red[0]), "lr": lr}, float(red[0]))
        loop.end_iteration(done)
    if dist.is_main():
        path = run.teacher_file()
        save_torch(path, {"format": FORMAT, "version": 1, "network": name, "options": options,
                          "shape": list(shape), "num_classes": num_classes,
                          "sigma_data": diff.sigma_data,
                          "state_dict": {k: v.cpu() for k, v in ema.model.state_dict().items()}})
        plot_curves(loop.log, run.out_dir / "teacher_curves.png", "teacher: EDM DSM loss")
        print(f"[ctmkit] teacher: {tt.iterations} iterations in {time.perf_counter() - t0:.0f}s "
              f"-> {path}")
    dist.barrier()
