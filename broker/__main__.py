"""`python -m broker` is the `podbroker` command."""

from broker.cli.main import app

app()
