"""``python -m reprmetrics``: the same command line as the ``reprmetrics`` console script."""

from reprmetrics.cli import console_main

if __name__ == "__main__":
    console_main(prog_name="python -m reprmetrics")
