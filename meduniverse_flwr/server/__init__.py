"""The server's side of a run: the strategy family (``strategy/``), grid I/O, validation of what
nodes send, aggregation, scoring, server-side privacy, the schedule, results, tracking, and the
stage-0 base (``pretrain/``).
"""
