"""The live dashboard of a run and its static report (see docs/ARCHITECTURE.md, "The dashboard")."""
