"""Move a PostgreSQL database into Supabase as Dagster assets: resumable, verifiable, PHI-safe."""

__version__ = "0.1.0"
