"""`python -m app` is `qm`."""

from app.cli import main

main()
