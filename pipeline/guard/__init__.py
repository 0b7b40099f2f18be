"""Safe and polite crawling: a guarding forward proxy for img2dataset (see proxy.py)."""
