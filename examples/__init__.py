"""Example worker fleets."""
