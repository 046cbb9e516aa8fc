"""Allow ``python -m vlkit`` (and ``torchrun -m vlkit``)."""

from vlkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
