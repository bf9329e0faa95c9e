"""`python -m sparqcli`: the same command line as the `sparq` console script."""

from sparqcli.cli import main

if __name__ == "__main__":
    main()
