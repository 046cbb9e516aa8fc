"""``vlkit configs``: list, show, copy and validate training config recipes."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from vlkit.errors import VlkitError


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``vlkit configs`` and its actions to the command line."""
    p = sub.add_parser(
        "configs", help="list, show, copy and validate training config recipes",
        description="The training recipes shipped with vlkit: list them, print one, copy one to a file you can "
        "edit, or check config files (every key and type) without training.",
    )
    csub = p.add_subparsers(dest="configs_command", metavar="ACTION")
    csub.required = True

    lst = csub.add_parser("list", help="the shipped recipes, each with its first comment line",
                          description="Print each shipped recipe's name with its first comment line (the "
                          "command that runs it).")
    lst.set_defaults(func=run_list)

    show = csub.add_parser("show", help="print a recipe's YAML", description="Print a shipped recipe's YAML.")
    show.add_argument("name", help="recipe name (see `vlkit configs list`)")
    show.set_defaults(func=run_show)

    cp = csub.add_parser("cp", help="copy a recipe to a file you can edit",
                         description="Copy a shipped recipe to DEST; an existing file is kept unless --force.")
    cp.add_argument("name", help="recipe name (see `vlkit configs list`)")
    cp.add_argument("dest", help="file to write, or an existing folder to write NAME.yaml into")
    cp.add_argument("--force", "-f", action="store_true", help="overwrite DEST if it exists")
    cp.set_defaults(func=run_cp)

    val = csub.add_parser("validate", help="check config files (default: every shipped recipe)",
                          description="Load each config with its overrides and report every problem (unknown "
                          "keys, wrong types, bad values); exit 2 if any config fails.")
    val.add_argument("files", nargs="*", metavar="FILE", help="YAML files or recipe names")
    val.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override applied before checking, e.g. --set optim.lr_head=1e-3 (repeatable)",
    )
    val.set_defaults(func=run_validate)


def run_list(args: argparse.Namespace) -> int:
    """Print each recipe name with its first comment line."""
    from vlkit.config.recipes import list_recipes, recipe_description, recipe_dirs

    names = list_recipes()
    if not names:
        print("no recipes found in " + ", ".join(str(d) for d in recipe_dirs()), file=sys.stderr)
        return 0
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {recipe_description(name)}".rstrip())
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Print a recipe's YAML text."""
    from vlkit.config.recipes import recipe_text

    text = recipe_text(args.name)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def run_cp(args: argparse.Namespace) -> int:
    """Copy a recipe to DEST, refusing to overwrite without ``--force``."""
    from vlkit.config.recipes import recipe_path

    src = recipe_path(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise VlkitError(f"{dest} already exists; use --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"wrote {dest}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    """Check each file (or every recipe); print ``ok NAME`` or its problems; 2 if any fails."""
    from vlkit.config.load import ConfigError, load_config
    from vlkit.config.recipes import find_config, list_recipes, recipe_path

    if args.files:
        targets = [(name, None) for name in args.files]
    else:
        names = list_recipes()
        if not names:
            raise VlkitError("no recipes to validate (and no FILE given)")
        targets = [(name, recipe_path(name)) for name in names]
    failed = 0
    for name, path in targets:
        try:
            load_config(path or find_config(name), args.overrides)
        except ConfigError as exc:
            failed += 1
            print(f"FAIL {name}: {len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        except VlkitError as exc:
            failed += 1
            print(f"FAIL {name}: {exc}", file=sys.stderr)
        else:
            print(f"ok {name}")
    return 2 if failed else 0
