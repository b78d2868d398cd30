"""Built-in teachers: ``gmm`` (analytic Gaussian mixture) and ``torchscript`` (a denoiser file)."""

from core.hookspecs import hookimpl
from plugins.teachers.gmm import GMMTeacher
from plugins.teachers.torchscript import TorchScriptTeacher


@hookimpl
def ctmkit_teachers():
    return {"gmm": lambda options, ctx: GMMTeacher.from_options(options),
            "torchscript": TorchScriptTeacher.from_options}
