"""Helpers every role uses and that know nothing of the method: files written atomically and read
with bounds (``files``), text from a node made safe to show (``text``). Imports nothing of this package.
"""
