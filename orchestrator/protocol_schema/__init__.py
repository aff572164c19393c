"""The pydantic schema of a protocol file, one module per section; read it through orchestrator.protocol."""
