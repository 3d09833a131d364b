"""`python -m app` is `qm`."""

from app.qm import main

main()
