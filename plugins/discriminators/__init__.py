"""Built-in discriminators of the GAN term (docs/gan.md): ``conv`` (small, from scratch) and
``projected`` (Sauer et al. 2021, on frozen timm feature networks; imported on use)."""

from core.api import hookimpl


def _projected(options, ctx, shape, num_classes):
    from plugins.discriminators.projected import make
    return make(options, ctx, shape, num_classes)


def _conv(options, ctx, shape, num_classes):
    from plugins.discriminators.conv import make
    return make(options, ctx, shape, num_classes)


@hookimpl
def ctmkit_discriminators():
    return {"conv": _conv, "projected": _projected}
