"""`python -m orchestrator` runs the cloop CLI."""
from orchestrator.cli import main

main()
