"""Parallel layout: world = dp x ep, passed explicitly to whoever needs it."""
