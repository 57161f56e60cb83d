"""What a hospital's node owns and enforces by itself: its site settings and its privacy floor and
ledger. Never imports ``server`` (``tests/test_layering.py``).
"""
