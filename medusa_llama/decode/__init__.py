"""Decoding: the fast backbone, Medusa heads, trees, acceptance rules and the decoders.

Imports nothing from ``train``, ``eval`` or ``cli``: this is what a serving process needs.
"""
