"""The ``imports:`` key of a config: user modules imported before the config is validated.

A plug-in module registers what it defines when it is imported (``register_task``, ``register_loss``,
``register_metric``, ``register_model``, ``register_optimizer``, ``register_schedule``), so the names it adds
are known when the rest of the config is checked. A module is looked up on ``sys.path`` (``PYTHONPATH``, the
installed packages, the working folder of ``python -m``), then in the folder of the config file, which is
appended to ``sys.path`` (last, so a file there never hides an installed module). A module is imported once per
process: loading the config again does not run it again.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlkit.errors import VlkitError

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def import_plugins(data: Mapping[str, Any], config_dir: Path | None, source: str) -> list[str]:
    """Import every module ``data["imports"]`` names, in order.

    A value that is not a list of strings is left to the validation, which reports it.

    Args:
        data: the config as plain data, overrides applied.
        config_dir: the folder of the config file (None for a config built from defaults).
        source: the config's name in messages.

    Returns:
        The names imported.

    Raises:
        VlkitError: one line naming the config, the key (``imports.N``) and the module, for a name that is
            not a dotted module name, a module that is not found, or one that fails while it is imported.
    """
    modules = data.get("imports")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        return []
    if modules and config_dir is not None:
        folder = str(Path(config_dir).resolve())
        if folder not in sys.path:
            sys.path.append(folder)
        importlib.invalidate_caches()  # a module written after this process started is found too
    for i, name in enumerate(modules):
        where = f"{source}: imports.{i}"
        if not _DOTTED.match(name):
            raise VlkitError(f"{where}: {name!r} is not a module name; give a dotted name such as "
                             f"my_package.my_module (the file my_package/my_module.py on PYTHONPATH or beside "
                             f"the config)")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or name
            if missing == name or name.startswith(missing + "."):
                raise VlkitError(f"{where}: module {name!r} not found on sys.path or in "
                                 f"{config_dir or 'the working folder'}; put it there or on PYTHONPATH") from None
            raise VlkitError(f"{where}: importing module {name!r} failed: {_first_line(exc)}") from None
        except Exception as exc:  # the plug-in's own error: one line, with its type
            raise VlkitError(f"{where}: importing module {name!r} failed: {_first_line(exc)}") from None
    return list(modules)
