"""``python -m banger`` runs the CLI."""

from banger.cli import main

if __name__ == "__main__":
    main()
