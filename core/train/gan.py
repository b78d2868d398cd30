"""CTM's GAN term (Kim et al. 2024, Sec. 4.2; docs/gan.md): a discriminator plugin
(``[discriminator]``, contract :class:`core.api.Discriminator`) trained with the hinge loss
against the student's jumps, and the generator's adversarial term ``-mean D(fake)`` added to
the distillation loss with ``[distill] gan_weight`` (a number, or ``"adaptive"``: CTM's
gradient-norm balance, as for the DSM term).

One iteration with the GAN on (``it >= gan_start``; ``k = generator_every``, CTM's
``g_learning_period``): with k = 1 the student's step (main + DSM + adversarial terms, then the
stop-gradient target and the EMAs) and a discriminator step on the same fakes (detached);
with k > 1, iteration ``it`` is the student's when ``(it - gan_start) % k == 0`` and the
discriminator's otherwise (the student, its target and EMAs then stay as they are). Every
iteration draws its batch from its own generator, takes the lr schedule's ``lr(it)`` for a
student step, counts for ``log_every`` / ``checkpoint_every``, and checkpoints hold the
discriminator and its optimiser.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from core.base import distributed as dist
from core.host import plugins
from core.base.errors import UserError, first_line
from core.train.loop import iteration_generator, make_optimizer

#: the random stream of the discriminator's draws (augmentations), apart from the loss's
GAN_STREAM = 1
#: the per-iteration statistics the GAN adds to metrics.csv (with counts of the iterations
#: that had them), in the order `Distiller` sums them
FIELDS = ("loss_gan", "gan_weight", "d_loss", "d_real", "d_fake")


def hinge_discriminator(real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's hinge loss mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))
    (Lim & Ye 2017; the projected GAN's), each logit of a sample counted alike."""
    return _mean(torch.relu(1 - real)) + _mean(torch.relu(1 + fake))


def _mean(logits: Tensor) -> Tensor:
    """The batch mean of each sample's mean logit (logits [B] or [B, ...])."""
    return logits.reshape(len(logits), -1).mean(1).mean()


def hinge_generator(fake: Tensor) -> Tensor:
    """The generator's adversarial term -mean D(fake)."""
    return -_mean(fake)


class GAN:
    """The discriminator of a distill run, its optimiser and its turns."""

    def __init__(self, run, device: str, sl: slice):
        cfg, d = run.cfg, run.cfg.distill
        self.sec, self.d, self.device, self.sl = cfg.discriminator, d, device, sl
        self.name = self.sec.data["name"]
        self.start, self.every, self.fake_kind = d.gan_start, d.generator_every, d.gan_fake
        self.plugin = plugins.get("discriminator", self.name, self.sec.where("name"))
        self.builtin = self.plugin.source.startswith("builtin")
        self.D = build_discriminator(run, self.sec).to(device).train()
        self.params = [p for p in self.D.parameters() if p.requires_grad]
        if not self.params:
            raise UserError(f"{self.sec.where('name')}: discriminator {self.name!r} has no "
                            f"trainable parameters")
        self.opt = make_optimizer(self.sec.data["optimizer"], self.params,
                                  float(self.sec.data["lr"]))
        self.checked = False

    # -- turns -----------------------------------------------------------------------------
    def active(self, it: int) -> bool:
        return it >= self.start

    def turns(self, it: int) -> tuple[bool, bool]:
        """(the student steps, the discriminator steps) at iteration `it`."""
        if not self.active(it):
            return True, False
        if self.every == 1:
            return True, True
        g = (it - self.start) % self.every == 0
        return g, not g

    # -- the discriminator -----------------------------------------------------------------
    def draws(self, it: int, like: Tensor) -> tuple[dict, dict]:
        """This rank's slice of the discriminator's draws for the real and the fake batch of
        iteration `it` (`like`: the global batch's shape, on the meta device)."""
        gen = iteration_generator(self.d.seed, it, GAN_STREAM)
        real, fake = self.D.draw(gen, like), self.D.draw(gen, like)
        cut = lambda dr: {k: v[self.sl].to(self.device) for k, v in dr.items()}
        return cut(real), cut(fake)

    def logits(self, x: Tensor, labels, draws: dict) -> Tensor:
        """D(x), checked on its first call (a tensor, one row per sample, finite): a plugin's
        error or a wrong result is one error line naming it."""
        try:
            out = self.D(x, labels, draws)
        except UserError:
            raise
        except Exception as e:
            if self.builtin:
                raise
            raise UserError(f"discriminator plugin {self.name!r} from {self.plugin.source} "
                            f"raised {e.__class__.__name__}: {first_line(e)}") from None
        if not self.checked:
            what = f"discriminator {self.name!r} ({self.plugin.source})"
            if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0]:
                got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise UserError(f"{what} returned {got} for a batch of {x.shape[0]}: expected "
                                f"logits [{x.shape[0]}, ...]")
            if not bool(torch.isfinite(out).all()):
                raise UserError(f"{what} returned non-finite logits (NaN or inf) at its first "
                                f"call")
            self.checked = True
        return out

    def generator_loss(self, fake: Tensor, labels, draws: dict) -> Tensor:
        """The student's adversarial term on its fakes (gradients flow into the fakes)."""
        return hinge_generator(self.logits(fake.float(), labels, draws).float())

    def step(self, real: Tensor, fake: Tensor, labels, real_draws: dict,
             fake_draws: dict) -> Tensor:
        """One discriminator step (real and fake rows in one call), its gradients averaged
        over processes. Returns [loss, mean real logit, mean fake logit] (float64, device)."""
        from core.train.distill import _average_over_processes

        self.opt.zero_grad(set_to_none=True)
        n = real.shape[0]
        x = torch.cat([real.float(), fake.detach().float()])
        lab = torch.cat([labels, labels]) if labels is not None else None
        draws = {k: torch.cat([real_draws[k], fake_draws[k]]) for k in real_draws}
        out = self.logits(x, lab, draws).float()
        loss = hinge_discriminator(out[:n], out[n:])
        loss.backward()
        _average_over_processes([p.grad if p.grad is not None else p.new_zeros(p.shape)
                                 for p in self.params])
        self.opt.step()
        return torch.stack([loss.detach(), out[:n].detach().mean(),
                            out[n:].detach().mean()]).double()

    def describe(self) -> dict:
        """What enters the run's fingerprint: the [discriminator] table and the GAN keys."""
        return {"section": dict(self.sec.data), "plugin": self.plugin.source.split(" (")[0]}


def build_discriminator(run, sec) -> nn.Module:
    """The discriminator plugin ``[discriminator] name`` built from `sec` for the teacher's
    sample shape and classes, its initial weights from ``[distill] seed`` (the same on every
    process, whatever the global generator's state)."""
    d, name = run.cfg.distill, sec.data["name"]
    shape, classes = tuple(run.teacher.shape), int(run.teacher.num_classes or 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(d.seed + 7919)
        D = plugins.build("discriminator", name, sec, run.ctx, sec.where("name"),
                          shape=shape, num_classes=classes)
    if not isinstance(D, nn.Module) or not callable(getattr(D, "draw", None)):
        raise UserError(f"{sec.where('name')}: discriminator plugin {name!r} returned "
                        f"{type(D).__name__}, not a core.api.Discriminator")
    return D


def probe(run) -> None:
    """Build the discriminator once on the CPU before any stage writes (a bad option, a
    missing or foreign weights file, projected on vectors: one error line, nothing written)."""
    from core.host.config import Section
    sec = run.cfg.discriminator
    copy = Section(sec.name, dict(sec.data), sec.source, sec.base_dir)
    copy._read = set(sec._read)
    build_discriminator(run, copy)


#: the [distill] keys of the GAN term
GAN_KEYS = ("gan_weight", "gan_start", "generator_every", "gan_fake")


def fingerprint_keys(keep: dict, d) -> dict:
    """`keep` (the [distill] keys that change a result) without the GAN keys when the GAN is
    off: they bear on the weights only when it is on, and the fingerprints of runs from
    before the GAN term still match."""
    return keep if d.gan_weight != 0.0 else {k: v for k, v in keep.items() if k not in GAN_KEYS}
