"""Guests we build: the small test guest (the demo)."""
