"""The torch.distributed backend "ichiban" (see backend.py)."""
