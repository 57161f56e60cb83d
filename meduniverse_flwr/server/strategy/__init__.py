"""The strategy family, one module per strategy: ``StageWise`` (MedUniverse) and the comparisons
that each change one of its decisions through its hooks.
"""
