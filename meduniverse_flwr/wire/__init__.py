"""What the server and the nodes agree on: the task card and its bounds, the instructions and the
message codec, the transport dtypes, the shared seeds. Imports no torch and neither side's code
(``tests/test_layering.py``).
"""
