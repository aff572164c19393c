"""``python -m rig_adapters --connect ... --adapter ...``: run a rig worker (the ``cloop rig`` command)."""

from rig_adapters.cli import main

main()
