"""``python -m nl_lightning ...`` runs the ``nl-lightning`` command line (see :mod:`nl_lightning.cli`)."""

from nl_lightning.cli import main

if __name__ == "__main__":
    main()
