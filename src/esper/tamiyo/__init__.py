"""Tamiyo, Esper's controller: decides at every step what to do with each seed slot."""
