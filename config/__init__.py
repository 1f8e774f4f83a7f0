"""Configuration and errors: settings, the sources file, the error types.

The bottom layer: every other package may import it, it imports none of them.
"""
