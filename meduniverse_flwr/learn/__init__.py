"""Learning on one machine, plain PyTorch and no Flower: the ViT factory, fine-tuning and scoring a
task, augmentation, DP-SGD and its accountant, metrics, the node-side loss terms (FedProx), and
pooled multi-task training (the centralized reference).
"""
