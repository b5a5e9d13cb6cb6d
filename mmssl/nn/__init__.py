"""Layers shared by every encoder and objective."""
