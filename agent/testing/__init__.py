"""Test doubles of external protocols that have no real implementation on these machines."""
