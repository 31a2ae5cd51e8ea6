"""Placeholder: replaced by the real topology module."""
