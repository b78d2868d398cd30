"""Built-in teachers: ``gmm`` (analytic Gaussian mixture), ``torchscript`` (a denoiser file),
``network`` (trained by the ``teacher`` stage), ``edm`` (an NVlabs EDM snapshot pickle) and
``openai`` (an openai/consistency_models teacher state dict)."""

from core.host.hookspecs import hookimpl
from plugins.teachers.gmm import GMMTeacher
from plugins.teachers.network import NetworkTeacher
from plugins.teachers.pretrained import EDMTeacher, OpenAITeacher
from plugins.teachers.torchscript import TorchScriptTeacher


@hookimpl
def ctmkit_teachers():
    return {"gmm": lambda options, ctx: GMMTeacher.from_options(options),
            "torchscript": TorchScriptTeacher.from_options,
            "network": NetworkTeacher.from_options,
            "edm": EDMTeacher.from_options,
            "openai": OpenAITeacher.from_options}
