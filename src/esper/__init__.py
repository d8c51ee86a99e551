"""Esper: morphogenetic training of neural networks."""
