"""`python -m silo`: the `silo` command."""

from silo.app.cli import main

if __name__ == "__main__":
    main()
