"""Command-line tools around a run's weights: ``export`` (a stage backbone as a timm / Hugging Face
folder) and ``convert`` (a public ViT checkpoint into a stage-0 backbone).
"""
