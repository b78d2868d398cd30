"""The config reference, generated from the key declarations in `core.host.config`: printed by
``ctmkit config``, and kept in docs/configuration.md by ``python tools/config_reference.py
--write`` (tests/test_config_reference.py checks that copy is current).

Every host key comes from its declaration (default, range or choices, help); the section
comments and the plugin-owned keys' notes below are the only hand-written parts.
"""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

from core.host.config import _REQUIRED, SEED_MAX, Derived, Key, declared

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
COLUMN = 29                  # where the comments start
WIDTH = 100                  # and end

#: Sections in the reference's order, with the comment on their header line.
SECTIONS = {
    "run": "",
    "data": "x_0 for teacher training, distillation, coefficients, evaluation",
    "network": "the teacher network, and the student's residual for analytic teachers",
    "teacher_train": "stage 'teacher'",
    "distill": "stage 'distill'",
    "discriminator": "the GAN term's, with [distill] gan_weight != 0 (docs/gan.md)",
    "diffusion": "",
    "teacher": "",
    "precond": "",
    "coefficients": "",
    "student": "",
    "export": "",
    "sample": "",
    "evaluate": "",
    "gap": "ctmkit gap config.toml: the consistency gap, measured before training",
    "search": "ctmkit search-schedule config.toml: the middle time(s) of K-step schedules, "
              "searched (docs/search_schedule.md)",
}

#: Keys read by plugins (and by core.data.source for [data]): notes, not declarations.
NOTES = {
    "data": """\
# path = "x0.npy"            # .npy / .npz (x, y) / .h5 (x, y) vectors, used as they are ...
# gmm = { weights = [..], means = [[..], ..], stds = [..] }   ... or an analytic mixture
# shape = [..]               # for .npz / .h5
# ... or a dataset plugin, named by format (images: [N, C, H, W] in [-1, 1]):
# format = "idx"             # folder | array | idx | cifar10 | edm | any dataset plugin
#   every format: path, hflip = false, limit = N, conditional = true (false drops labels),
#     cache_dir = "<folder>" (default out_dir/datastore: the uint8 stores decoded once, shared
#     by every run, stage and rank; a folder on a shared filesystem serves several nodes)
#   folder:  channels = 3 (1 | 3), resolution = R (bicubic resize; else all sizes must match),
#            transform = "none" | "center-crop" (dataset_tool's: crop, then Lanczos to R),
#            workers = min(8, cores) (decode processes)
#   array:   layout = "auto" | "NCHW" | "NHWC", range = "auto" | "unit" | "byte"
#            (a .npy is memory-mapped in place; .npz / .h5 arrays are loaded)
#   idx:     split = "train" | "test" (path = folder), labels = "<labels file>" (default: found)
#   cifar10: split = "train" | "test" (path = cifar-10-batches-py; trusted pickles)
#   edm:     path = "cifar10-32x32.zip" (or its folder): NVlabs/edm dataset_tool output,
#            PNGs in sorted name order, labels from dataset.json; sizes checked;
#            resolution, transform and workers as for folder""",
    "network": """\
# mlp:  width = 256, depth = 4, emb_dim = 64
# unet: model_channels = 32, channel_mult = [1, 2, 2], num_blocks = 2,
#       attn_resolutions = [lowest] ([] = none), num_heads = 1, dropout = 0.0,
#       embedding = "positional" | "fourier", scale_shift = true, resample = "conv" | "avgpool"
#       (CIFAR-10 DDPM++ size: 128, [2, 2, 2], 4, [16], dropout 0.13 -> 57M parameters)""",
    "teacher": """\
# gmm:         weights = [..], means = [[..], ..] (one row per component), stds = [..],
#              shape = [..] (optional; default [d])
# torchscript: path = "denoiser.pt", shape = [C, H, W], num_classes = 0
# network:     path = "teacher.pt" (default: out_dir/teacher.pt, written by stage 'teacher')
# edm:         path = "edm-cifar10-32x32-cond-vp.pkl", network = "ema"
# openai:      path = "edm_imagenet64_ema.pt", plus UNetModel settings under openai's names
# edm, openai: dtype = "float32" | "bfloat16" | "float16": how the teacher runs where float32
#              is asked for (distillation, sampling); float64 coefficient JVPs stay float64""",
    "precond": """\
# analytic: variant = "backward"   # forward (Eqn. 14) | backward (Table 1)
# other keys go to the plugin (see the plugin guide)""",
    "discriminator": """\
# conv:      width = 64, depth = 3 (vectors: linear layers), augment = [] (images: any of
#            "color", "translation", "cutout": DiffAugment)
# projected: weights = ["tf_efficientnet_lite0.pth"] (one local file per backbone; required),
#            backbones = ["tf_efficientnet_lite0"] (| "deit_base_distilled_patch16_224"),
#            resolution = 224, width = 64, cmap = 64, augment = ["color", "translation",
#            "cutout"], random_weights = false (true: random backbones, tests only)""",
    "sample": """\
# ctm sampler: gamma = 0.0   # CTM's gamma-sampling (0 deterministic, 1 = CM)""",
    "evaluate.metric": """\
# features = "inception"     # inception (keys fid, kid) | feature_net (fid_featnet-<hash>, ...)
# mode = "clean"             # inception: clean (fid, kid) | legacy_tensorflow (fid_legacy_tf,
#                            # kid_legacy_tf: the net's TF-style resize, as EDM/StyleGAN2-ADA)
# reference = "cifar10-32x32.npz"  # fid + inception only: precomputed mu/sigma (EDM's fid-refs,
#                            # made as legacy_tensorflow) instead of [data]'s; kid refuses it
#                            # metrics.json: quality.info / samples.<key>_info = features, mode,
#                            # reference
# inception = "/path/to/inception-2015-12-05.pt"   # default: clean-fid's cache, /tmp
# feature_net = "auto"       # a file from ctmkit feature-net, or auto (train on [data])
# num = 10000                # reference images
# seed = 0
# batch = 100""",
}


def toml(v) -> str:
    """`v` as a TOML value (inline tables spaced as in the reference)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"no TOML form for {v!r}")


def _num(v) -> str:
    if v == SEED_MAX:
        return "2^63 - 1"
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def _range(k: Key) -> str:
    """A key's bounds, as the reference shows them."""
    each = "each " if k.kind in ("ints", "floats") else ""
    if k.kind == "seed":
        return ""
    if k.min is not None and k.max is not None:
        r = f"{each}{_num(k.min)} to {_num(k.max)}"
    elif k.min is not None:
        r = f"{each}>= {_num(k.min)}"
    elif k.max is not None:
        r = f"{each}<= {_num(k.max)}"
    else:
        r = f"{each}> 0" if k.positive else ""
    words = " or ".join(json.dumps(w) for w in k.words)
    return f"{r}, or {words}" if r and words else r or words


def shown(k: Key, ctx: dict):
    """The value a key's line shows: its default, else its example."""
    if k.example is not None:
        return k.example
    return k.default.of(ctx) if isinstance(k.default, Derived) else k.default


def comment(k: Key) -> str:
    """A key's comment: status (required / optional / derived default); choices: help [range]."""
    status = "required" if k.default is _REQUIRED else "optional" if k.example is not None \
        else f"default: {k.default.text}" if isinstance(k.default, Derived) else ""
    what = ": ".join(x for x in (" | ".join(k.choices or ()), k.help) if x)
    rng = _range(k)
    return "; ".join(x for x in (status, what) if x) + (f" [{rng}]" if rng else "")


def line(lhs: str, text: str) -> list[str]:
    """`lhs` with `text` as a comment wrapped at WIDTH, continued at COLUMN."""
    if not text:
        return [lhs]
    pad = lhs.ljust(COLUMN) if len(lhs) < COLUMN - 1 else lhs + "   "
    return textwrap.wrap(" ".join(text.split()), WIDTH, initial_indent=pad + "# ",
                         subsequent_indent=" " * COLUMN + "# ", break_on_hyphens=False,
                         break_long_words=False)


def render() -> str:
    """The reference: a TOML block of every section, its keys at their defaults."""
    keys = declared()
    assert set(keys) == set(SECTIONS), "core/config_reference.py: SECTIONS is out of date"
    run = {k.name: shown(k, {}) for k in keys["run"] if not isinstance(k.default, Derived)}
    ctx = {"run": SimpleNamespace(**run)}
    out = []
    for name, about in SECTIONS.items():
        out += [""] + line(f"[{name}]", about)
        tables = [k for k in keys[name] if k.kind == "table"]
        for k in keys[name]:
            if k.kind != "table":
                out += line(f"{k.name} = {toml(shown(k, ctx))}", comment(k))
        ctx.setdefault(name, SimpleNamespace(**{k.name: shown(k, ctx) for k in keys[name]}))
        if name in NOTES:
            out += NOTES[name].split("\n")
        for k in tables:
            sub = f"{name}.{k.name}"
            out += [""] + line(f"[{sub}]", comment(k))
            if sub in NOTES:
                out += NOTES[sub].split("\n")
    return "```toml\n" + "\n".join(out[1:]) + "\n```\n"


def toml_text() -> str:
    """The reference as a TOML file (what ``ctmkit config`` prints)."""
    return render()[len("```toml\n"):-len("```\n")]


def page_copy(text: str, where: str = "docs/configuration.md") -> str:
    """The text between the markers of a page's `text` (a UserError unless there is one)."""
    from core.base.errors import UserError

    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise UserError(f"{where}: expected one {BEGIN} ... {END} block")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def replace_copy(text: str, ref: str) -> str:
    """`text` with the block between its markers replaced by `ref`."""
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{ref}{END}{rest.split(END, 1)[1]}"
