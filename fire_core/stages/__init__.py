"""Pipeline stages that sit above the mechanisms they call (issue 12 moves every stage here)."""
