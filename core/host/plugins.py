"""The plugin host: one pluggy manager, built-ins and entry points registered the same way.

`registry()` returns, per kind, ``{name: Plugin(factory, source)}``; two plugins that claim
one name are a `UserError` naming both sources.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from core.host import hookspecs
from core.base.errors import UserError, first_line

#: the built-in plugin modules, registered exactly like third-party entry points
BUILTIN_MODULES = (
    "plugins.teachers",
    "plugins.preconditionings",
    "plugins.solvers",
    "plugins.samplers",
    "plugins.networks",
    "plugins.unet",
    "plugins.losses",
    "plugins.datasets",
    "plugins.metrics",
    "plugins.discriminators",
)


@dataclass(frozen=True)
class Plugin:
    kind: str
    name: str
    factory: Callable
    source: str


@dataclass
class Context:
    """What a plugin factory may need beyond its own options."""
    diffusion: Any                         # core.host.config.DiffusionCfg
    device: str = "cpu"
    base_dir: Any = None                   # folder relative paths resolve against
    out_dir: Any = None                    # the run's output folder
    progress: bool = True                  # show progress bars
    coefficients_loader: Callable | None = field(default=None, repr=False)

    def coefficients(self):
        """The Analytic-Precond coefficient table for this run (loads and validates it)."""
        if self.coefficients_loader is None:
            raise UserError("this preconditioning needs Analytic-Precond coefficients: "
                            "run the 'coefficients' stage first")
        return self.coefficients_loader()


#: plugin object id -> "distribution version (module)" for entry-point plugins
_SOURCES: dict[int, str] = {}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every ``ctmkit`` entry point; one that does not import is a UserError naming
    its distribution (pluggy's own loader would not say which one)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=hookspecs.PROJECT):
        dist = getattr(ep, "dist", None)
        owner = f"{dist.name} {dist.version}" if dist is not None else "an unknown distribution"
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as e:  # the user's environment, not ctmkit
            raise UserError(f"the 'ctmkit' entry point {ep.name!r} of {owner} failed to import: "
                            f"{e.__class__.__name__}: {first_line(e, 200, '(no message)')}"
                            ) from None
        try:
            pm.register(plugin, name=ep.name)
        except ValueError as e:  # pluggy: a module registered twice under two names
            raise UserError(f"plugin loading failed ({owner}): {e}") from None
        _SOURCES[id(plugin)] = f"{owner} ({getattr(plugin, '__name__', ep.value)})"


@functools.lru_cache(maxsize=1)
def manager() -> pluggy.PluginManager:
    import importlib

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN_MODULES:
        pm.register(importlib.import_module(modname), name=f"builtin:{modname}")
    _load_entry_points(pm)
    try:      # a hook implementation whose name no hookspec declares (a typo) is an error
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise UserError(f"plugin {_SOURCES.get(id(e.plugin), e.plugin)}: "
                        f"{first_line(e, 200, '(no message)')} "
                        f"(the hooks are {', '.join(hookspecs.KINDS)})") from None
    return pm


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Plugin]]:
    pm = manager()
    out: dict[str, dict[str, Plugin]] = {}
    for hook_name, kind in hookspecs.KINDS.items():
        table: dict[str, Plugin] = {}
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin
            builtin = impl.plugin_name.startswith("builtin:")
            source = (f"builtin ({plugin.__name__})" if builtin
                      else _SOURCES.get(id(plugin), impl.plugin_name))
            try:
                mapping = impl.function()
            except Exception as e:
                if builtin:
                    raise               # a bug in ctmkit keeps its traceback
                raise UserError(f"plugin {source}: {hook_name}() raised {e.__class__.__name__}: "
                                f"{first_line(e, 200, '(no message)')}") from None
            if not isinstance(mapping, dict):
                raise UserError(f"plugin {source}: {hook_name} must return a dict of "
                                f"name -> factory, got {type(mapping).__name__}")
            for name, factory in mapping.items():
                if name in table:
                    raise UserError(f"{kind} plugin name {name!r} is claimed twice: by "
                                    f"{table[name].source} and by {source}")
                table[name] = Plugin(kind, name, factory, source)
        out[kind] = dict(sorted(table.items()))
    return out


def get(kind: str, name: str, where: str = "") -> Plugin:
    table = registry()[kind]
    if name not in table:
        at = f"{where}: " if where else ""
        raise UserError(f"{at}unknown {kind} {name!r} (available: {', '.join(table) or 'none'})")
    return table[name]


def build(kind: str, name: str, options, ctx, where: str, **kwargs):
    """The one way a plugin is made: look `name` up among the `kind` plugins (an unknown name
    is a UserError naming `where` and the choices), call its factory as ``factory(options,
    ctx, **kwargs)``, then report the keys of `options` nobody read. A third-party factory's
    unexpected exception is a one-line UserError naming the plugin and its distribution."""
    plugin = get(kind, name, where)
    try:
        obj = plugin.factory(options, ctx, **kwargs)
    except UserError:
        raise
    except Exception as e:
        if plugin.source.startswith("builtin"):
            raise                       # a bug in ctmkit keeps its traceback
        raise UserError(f"{kind} plugin {plugin.name!r} from {plugin.source} failed to build: "
                        f"{e.__class__.__name__}: {first_line(e, 200, '(no message)')}") from None
    options.finish()
    return obj


def create(kind: str, options, ctx: Context, key: str, name: str | None = None):
    """Build the plugin named `name` (default: ``options[key]``) from the rest of ``options``."""
    name = name if name is not None else options.data.get(key)
    options._read.add(key)
    return build(kind, name, options, ctx, options.where(key))


def create_network(name: str, options: dict, ctx: Context, shape, num_classes: int,
                   student: bool, source: str):
    """Build network plugin `name` from its `options` (a plain dict, e.g. ``[network]`` less
    its name, or what a teacher file recorded) for samples of `shape`; unknown keys are an
    error, as in any section."""
    from pathlib import Path

    from core.host.config import Section

    return build("network", name, Section("network", dict(options), source, Path(".")), ctx,
                 f"{source}: network", shape=tuple(shape), num_classes=num_classes,
                 student=student)


def list_lines() -> list[str]:
    rows = [(p.kind, p.name, p.source) for table in registry().values() for p in table.values()]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return [f"{k:<{w0}}  {n:<{w1}}  {s}" for k, n, s in rows]
