"""Token-reduction methods: `<method>_algo.py` (torch only) + `<method>.py` (timm integration)."""
