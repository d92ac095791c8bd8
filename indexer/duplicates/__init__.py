"""Duplicates across the whole collection: found by tier (evidence), stored by the scan (scan,
neighbours), grouped with a keep pick (groups, keep), decided by people (decisions), acted on
only through a written plan (plan)."""
