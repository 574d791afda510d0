"""lorelib: the code behind utils.py (LoRe, personalized low-rank reward modeling), one module per concern.

Scripts and notebooks import utils.py, the published face, which re-exports every public name from here.
Importing this package imports none of its modules (no work at import); CONTRIBUTING.md has the module map.
"""
