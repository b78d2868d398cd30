"""Bounds on what a file or a config may ask for, checked before anything is allocated.

One place for the limits that are not a single config key's range (those are declared with
the key in core/host/config.py):

* nesting depth of TOML values and JSON documents (`text_nesting`, `check_nesting`,
  `load_json`): the parsers recurse, so a document of 10,000 nested arrays is refused by a
  linear scan of its text before it is parsed;
* object graphs read from pickles (`check_graph`): unique objects, nesting depth and the size
  the graph expands to when shared references are followed (a "billion laughs" pickle: a list
  holding the same list twice, 40 levels deep, is 80 objects but 2^40 when walked);
* network constructor arguments from a snapshot or a config (`check_network_kwargs`): types,
  signs, sizes and the parameter count they imply;
* state dicts (`check_state_dict`): every tensor dense, with data, real, and floating point
  where the network holds floating point.

Every refusal is one `UserError` line naming the key (or the place) and the bound.
"""

from __future__ import annotations

import itertools
import json
import math
import re

from core.base.errors import UserError

#: nesting of TOML values / JSON values: configs, meta.json, dataset.json, stages.json nest a
#: few levels; 32 is far beyond any of them and far below Python's recursion limit
MAX_DEPTH = 32
#: a JSON document ctmkit reads (meta.json, dataset.json, stages.json, metrics.json)
MAX_JSON_BYTES = 64 << 20
#: an object graph read from a pickle: unique objects, their nesting, and the tree they
#: expand to when shared references are followed (a real EDM snapshot: a few thousand)
MAX_PICKLE_OBJECTS = 1_000_000
MAX_PICKLE_DEPTH = 100
MAX_PICKLE_EXPANDED = 1_000_000

# strings and comments, whose brackets do not nest (JSON has no comments and no ' strings)
_TOML_SKIP = re.compile(r'"""(?:\\.|[^\\])*?"""|\'\'\'.*?\'\'\'|"(?:\\.|[^"\\\n])*"|'
                        r"'[^'\n]*'|#[^\n]*", re.S)
_JSON_SKIP = re.compile(r'"(?:\\.|[^"\\])*"')
_BRACKETS = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def text_nesting(text: str, kind: str = "toml") -> int:
    """The deepest nesting of brackets and braces in a TOML (`kind` "toml") or JSON ("json")
    text, strings and comments skipped: linear in the text, no recursion."""
    skip = _TOML_SKIP if kind == "toml" else _JSON_SKIP
    brackets = _BRACKETS.sub("", skip.sub("", text))
    return max(itertools.accumulate(_STEP[c] for c in brackets), default=0)


def _dotted(limit: int) -> re.Pattern:
    return re.compile(r"(?:[A-Za-z0-9_\-]*[ \t]*\.[ \t]*){%d,}" % limit)


def check_text_nesting(text: str, where: str, kind: str = "toml",
                       limit: int = MAX_DEPTH) -> None:
    """A `UserError` when `text` nests brackets deeper than `limit`, or (TOML) holds a dotted
    key of more than `limit` parts -- checked before parsing: tomllib recurses on brackets and
    takes quadratic time in a dotted key's length."""
    depth = text_nesting(text, kind)
    if depth > limit:
        raise UserError(f"{where}: values nest {depth} levels deep; the bound is {limit}")
    if kind == "toml" and _dotted(limit).search(_TOML_SKIP.sub("", text)):
        raise UserError(f"{where}: a dotted key has more than {limit} parts; the bound is "
                        f"{limit}")


def check_nesting(obj, where: str, limit: int = MAX_DEPTH) -> None:
    """A `UserError` naming the first key path nested deeper than `limit` levels of dicts and
    lists (e.g. TOML's dotted keys a.b.c...; JSON). Iterative: any depth is safe to check."""
    stack = [(obj, 0, "")]
    while stack:
        node, depth, at = stack.pop()
        if isinstance(node, dict):
            children = ((f"{at}.{k}" if at else str(k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            children = ((f"{at}[{i}]", v) for i, v in enumerate(node))
        else:
            continue
        if depth >= limit:
            raise UserError(f"{where}: {at[:60] or 'the top level'} nests more than {limit} "
                            f"levels deep; the bound is {limit}")
        stack.extend((v, depth + 1, k) for k, v in children)


def load_json(raw: str | bytes, where: str, what: str = "JSON file",
              max_bytes: int = MAX_JSON_BYTES, limit: int = MAX_DEPTH):
    """`raw` parsed as JSON, after checking its size (`max_bytes`) and nesting (`limit`);
    a one-line `UserError` ("<where>: <what> is not valid JSON (...)") otherwise."""
    if len(raw) > max_bytes:
        raise UserError(f"{where}: {what} is {len(raw):,} bytes; the bound is {max_bytes:,}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError:
        raise UserError(f"{where}: {what} is not valid JSON (not UTF-8)") from None
    depth = text_nesting(text, "json")
    if depth > limit:
        raise UserError(f"{where}: {what} nests {depth} levels deep; the bound is {limit}")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"{where}: {what} is not valid JSON ({detail})") from None


# --- object graphs from pickles ------------------------------------------------------------

def _children(node):
    if isinstance(node, dict):
        return list(node.keys()) + list(node.values())
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    state = getattr(node, "state", None)          # the unpickler's stubs keep a state dict
    return [state] if isinstance(state, dict) else []


def check_graph(root, where: str, *, max_objects: int = MAX_PICKLE_OBJECTS,
                max_depth: int = MAX_PICKLE_DEPTH,
                max_expanded: int = MAX_PICKLE_EXPANDED) -> None:
    """Refuse an object graph (from a pickle) with more than `max_objects` containers, nested
    deeper than `max_depth`, or expanding to more than `max_expanded` nodes when every shared
    reference is followed (what a recursive walk of it would visit). Linear in the unique
    objects: each one is measured once."""
    size: dict[int, int] = {}                      # id -> expanded size (finished nodes)
    on_path: set[int] = set()
    stack = [(root, 0, False)]
    keep = []                                      # ids stay valid while we hold the nodes
    while stack:
        node, depth, done = stack.pop()
        kids = _children(node)
        if not kids and not isinstance(node, (dict, list, tuple, set, frozenset)):
            continue                               # a leaf: number, string, tensor, ...
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size.get(id(k), 1) for k in kids)
            if total > max_expanded:
                raise UserError(f"{where}: its objects expand to more than {max_expanded:,} "
                                f"through shared references (a 'billion laughs' pickle?); "
                                f"the bound is {max_expanded:,}")
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise UserError(f"{where}: holds an object that contains itself")
        if depth >= max_depth:
            raise UserError(f"{where}: objects nest more than {max_depth} levels deep; the "
                            f"bound is {max_depth}")
        if len(size) + len(on_path) >= max_objects:
            raise UserError(f"{where}: holds more than {max_objects:,} objects; the bound is "
                            f"{max_objects:,}")
        on_path.add(key)
        keep.append(node)
        stack.append((node, depth, True))
        stack.extend((k, depth + 1, False) for k in kids)


# --- network constructor arguments ---------------------------------------------------------

#: (kind, lowest, highest) of each constructor argument a network file or config may set; the
#: names of EDM's precond / SongUNet / DhariwalUNet and openai's UNetModel
NETWORK_BOUNDS = {
    **{k: ("int", 1, 4096) for k in ("img_resolution", "image_size")},
    **{k: ("int", 1, 64) for k in ("img_channels", "in_channels", "out_channels")},
    **{k: ("int", 0, 100_000) for k in ("label_dim", "num_classes")},
    "augment_dim": ("int", 0, 1024),
    **{k: ("int", 1, 4096) for k in ("model_channels", "num_channels")},
    **{k: ("int", 1, 64) for k in ("num_blocks", "num_res_blocks", "channel_mult_emb",
                                   "channel_mult_noise")},
    "num_heads": ("int", -1, 1024), "num_head_channels": ("int", -1, 4096),
    "num_heads_upsample": ("int", -1, 1024),
    "channel_mult": ("numbers", 1, 64),
    **{k: ("numbers", 1, 4096) for k in ("attn_resolutions", "attention_resolutions",
                                         "attention_ds")},
    "resample_filter": ("numbers", 0, 1 << 16),
    **{k: ("float", 0.0, 1.0) for k in ("dropout", "label_dropout")},
    **{k: ("float", 0.0, math.inf) for k in ("sigma_min", "sigma_max", "sigma_data", "beta_d",
                                             "beta_min", "M", "epsilon_t")},
    **{k: ("bool", None, None) for k in ("use_fp16", "conv_resample", "use_scale_shift_norm",
                                         "resblock_updown", "use_new_attention_order",
                                         "class_cond", "learn_sigma", "use_checkpoint")},
}
#: at most this many (estimated) parameters: 4 GiB of float32 weights
MAX_NETWORK_PARAMETERS = 1 << 30
MAX_LIST_ENTRIES = 16


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(where: str, key: str, v, kind: str, lo, hi) -> None:
    def fail(why):
        raise UserError(f"{where}: {key} = {_short(v)} {why}")
    if kind == "bool":
        if not isinstance(v, bool):
            fail("must be true or false")
    elif kind == "int":
        if not _is_int(v):
            fail("must be an integer")
        if not lo <= v <= hi:
            fail(f"is beyond the bound [{lo}, {hi:,}]")
    elif kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            fail("must be a finite number")
        if not lo <= v <= hi:
            fail(f"is beyond the bound [{lo}, {hi}]")
    elif kind == "numbers":
        if isinstance(v, str):            # openai's "32,16,8": parsed by its builder
            return
        if not isinstance(v, (list, tuple)) or len(v) > MAX_LIST_ENTRIES:
            fail(f"must be a list of at most {MAX_LIST_ENTRIES} numbers")
        for x in v:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not lo <= x <= hi:
                fail(f"must hold numbers in the bound [{lo}, {hi:,}]")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def estimated_parameters(kwargs: dict) -> int:
    """A rough upper estimate of a U-Net's parameter count from its constructor arguments:
    two 3x3 convolutions per block at each level's width, encoder and decoder."""
    mc = kwargs.get("model_channels", kwargs.get("num_channels", 128))
    mult = kwargs.get("channel_mult", (1, 2, 2, 2))
    blocks = kwargs.get("num_blocks", kwargs.get("num_res_blocks", 4))
    if not (_is_int(mc) and _is_int(blocks) and isinstance(mult, (list, tuple)) and mult):
        return 0
    widths = [mc * float(m) for m in mult]
    return int(sum(2 * (2 * blocks + 1) * 9 * w * w for w in widths))


def check_network_kwargs(kwargs: dict, where: str) -> None:
    """Types, signs and sizes of a network's constructor arguments (`NETWORK_BOUNDS`, nested
    ``model_kwargs`` too) and the parameter count they imply; keys not in the table are left
    to the constructor."""
    for key, v in kwargs.items():
        if key == "model_kwargs" and isinstance(v, dict):
            check_network_kwargs(v, where)
        elif key in NETWORK_BOUNDS and not (v is None and key == "num_classes"):
            _check_value(where, key, v, *NETWORK_BOUNDS[key])
    n = estimated_parameters({**kwargs, **(kwargs.get("model_kwargs") or {})})
    if n > MAX_NETWORK_PARAMETERS:
        raise UserError(f"{where}: model_channels, channel_mult and the block count ask for "
                        f"about {n:,} parameters; the bound is {MAX_NETWORK_PARAMETERS:,}")


# --- state dicts ---------------------------------------------------------------------------

def check_state_dict(sd, where: str, expected=None) -> None:
    """Every tensor of state dict `sd` is dense (not sparse), holds data (not a meta tensor),
    is real (not complex) and not quantized; where `expected` (the network's own state dict)
    holds floating point, so must `sd`. A `UserError` names the first offending entry."""
    from collections.abc import Mapping

    import torch

    if not isinstance(sd, Mapping):
        raise UserError(f"{where}: not a state dict (a {type(sd).__name__})")
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{where}: {name} is a {type(t).__name__}, not a tensor")
        why = ("is a sparse tensor" if t.layout != torch.strided else
               "is a meta tensor (it holds no data)" if t.is_meta else
               f"is {str(t.dtype).replace('torch.', '')} (complex)" if t.is_complex() else
               "is a quantized tensor" if t.is_quantized else None)
        if why is None and expected is not None and name in expected:
            want = expected[name]
            if want.is_floating_point() and not t.is_floating_point():
                why = (f"is {str(t.dtype).replace('torch.', '')}; the network holds "
                       f"{str(want.dtype).replace('torch.', '')} there")
        if why:
            raise UserError(f"{where}: {name} {why}")
