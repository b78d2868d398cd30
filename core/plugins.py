"""The plugin host: one pluggy manager, built-ins and entry points registered the same way.

`registry()` returns, per kind, ``{name: Plugin(factory, source)}``; two plugins that claim
one name are a `UserError` naming both sources.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import pluggy

from core import hookspecs
from core.errors import UserError

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
    diffusion: Any                         # core.config.DiffusionCfg
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


def _source_names(pm: pluggy.PluginManager) -> dict:
    names = {}
    for plugin, dist in pm.list_plugin_distinfo():
        names[id(plugin)] = f"{dist.project_name} {dist.version} ({plugin.__name__})"
    return names


@functools.lru_cache(maxsize=1)
def manager() -> pluggy.PluginManager:
    import importlib

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN_MODULES:
        pm.register(importlib.import_module(modname), name=f"builtin:{modname}")
    try:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    except ValueError as e:  # pluggy: a module registered twice under two names
        raise UserError(f"plugin loading failed: {e}") from None
    except Exception as e:  # an entry point that does not import is the user's environment
        raise UserError(f"a 'ctmkit' entry-point plugin failed to load: "
                        f"{e.__class__.__name__}: {e}") from None
    return pm


@functools.lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Plugin]]:
    pm = manager()
    dist_names = _source_names(pm)
    out: dict[str, dict[str, Plugin]] = {}
    for hook_name, kind in hookspecs.KINDS.items():
        table: dict[str, Plugin] = {}
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin
            source = (f"builtin ({plugin.__name__})" if impl.plugin_name.startswith("builtin:")
                      else dist_names.get(id(plugin), impl.plugin_name))
            mapping = impl.function()
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


def create(kind: str, options, ctx: Context, key: str, name: str | None = None):
    """Build the plugin named `name` (default: ``options[key]``) from the rest of ``options``."""
    plugin = get(kind, name if name is not None else options.data.get(key), options.where(key))
    options._read.add(key)
    obj = plugin.factory(options, ctx)
    options.finish()
    return obj


def list_lines() -> list[str]:
    rows = [(p.kind, p.name, p.source) for table in registry().values() for p in table.values()]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return [f"{k:<{w0}}  {n:<{w1}}  {s}" for k, n, s in rows]
