"""The `teacher` stage: train a denoiser network with EDM's preconditioning and DSM loss
(log-normal noise levels ln t ~ N(P_mean, P_std^2), weight (t^2 + sigma_data^2) / (t sigma_data)^2)
on the data of [data]; writes ``teacher.pt`` (EMA weights) for ``[teacher] kind = "network"``."""

from __future__ import annotations

import hashlib
import json
import time

import torch
from tqdm.auto import tqdm

from core import distributed as dist
from core.errors import UserError
from core.io import save_torch
from core.training import (EMA, MetricsLog, iteration_generator, lr_at, make_optimizer,
                           plot_curves, resume, save_checkpoint)
from plugins.losses import DSMLoss
from plugins.networks import EDMDenoiser
from core.plugins import create_network
from plugins.teachers.network import FORMAT


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
    fp = hashlib.sha256(json.dumps({"network": cfg.network.data, "data": source.fingerprint(),
                                    "train": {k: v for k, v in vars(tt).items()
                                              if k not in ("iterations", "checkpoint_every",
                                                           "keep_checkpoints", "log_every")},
                                    "sigma_data": diff.sigma_data}, sort_keys=True,
                                   default=str).encode()).hexdigest()
    ckdir = run.out_dir / "teacher_checkpoints"
    if dist.is_main():        # fails (one line) before any log or checkpoint is written
        ckdir.mkdir(parents=True, exist_ok=True)
    modules = {"net": net, "ema": ema.model}
    start, _ = resume(ckdir, fp, modules, opt)
    log = MetricsLog(run.out_dir / "teacher_metrics.csv", ["loss_dsm", "lr"], start)
    bar = tqdm(total=tt.iterations, initial=start, desc="teacher", unit="it",
               disable=not (run.progress and dist.is_main()), leave=False)
    t0 = time.perf_counter()
    for it in range(start, tt.iterations):
        gen = iteration_generator(tt.seed, it, stream=1)
        x0, labels = source.sample(tt.batch_size, gen)
        x0 = x0.float()
        draws = {k: v[sl] for k, v in loss.draw(gen, x0).items()}
        x0 = x0[sl].to(device)
        labels = labels[sl].to(device) if labels is not None else None
        sigma = draws["sigma"].to(device)
        x = x0 + sigma.reshape([-1] + [1] * (x0.dim() - 1)).float() * draws["z"].to(device)
        D = denoise(x, sigma.float(), labels)
        weight = (sigma ** 2 + diff.sigma_data ** 2) / (sigma * diff.sigma_data) ** 2
        l = (weight.float() * ((D - x0) ** 2).flatten(1).mean(1)).mean()
        red = dist.all_reduce_sum(l.detach().double().cpu().reshape(1)) / world
        if not torch.isfinite(red).all():
            raise UserError(f"teacher: non-finite loss at iteration {it}; stopped")
        lr = lr_at(it, tt.lr, tt.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        l.backward()
        if tt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), tt.grad_clip)
        opt.step()
        ema.update(net)
        done = it + 1
        bar.update(1)
        if done % tt.log_every == 0 or done == tt.iterations:
            log.add(done, {"loss_dsm": float(red[0]), "lr": lr})
            bar.set_postfix(loss=f"{float(red[0]):.4g}")
        if done % tt.checkpoint_every == 0 or done == tt.iterations:
            log.flush()
            save_checkpoint(ckdir, done, fp, modules, opt, tt.keep_checkpoints)
    bar.close()
    log.flush()
    if dist.is_main():
        path = run.teacher_file()
        save_torch(path, {"format": FORMAT, "version": 1, "network": name, "options": options,
                          "shape": list(shape), "num_classes": num_classes,
                          "sigma_data": diff.sigma_data,
                          "state_dict": {k: v.cpu() for k, v in ema.model.state_dict().items()}})
        plot_curves(log, run.out_dir / "teacher_curves.png", "teacher: EDM DSM loss")
        print(f"[ctmkit] teacher: {tt.iterations} iterations in {time.perf_counter() - t0:.0f}s "
              f"-> {path}")
    dist.barrier()
