"""The mailscreen administration command."""
