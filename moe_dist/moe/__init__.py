"""Mixture-of-Experts layers: routers, dispatchers, expert weights."""
