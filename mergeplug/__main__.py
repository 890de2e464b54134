"""``python -m mergeplug``: the same as the ``mergeplug`` command."""
from .cli import main

main()
