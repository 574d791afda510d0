"""lorelib: the code behind utils.py (LoRe, personalized low-rank reward modeling), one module per concern.

Scripts import these modules directly; utils.py beside the package is the published face for notebooks.
Importing this package imports none of its modules (no work at import); CONTRIBUTING.md has the module map.
"""
