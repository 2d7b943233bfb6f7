"""``python -m reprmetrics``: the same command line as the ``reprmetrics`` console script."""

from reprmetrics.cli import main

if __name__ == "__main__":
    raise SystemExit(main(prog_name="python -m reprmetrics"))
