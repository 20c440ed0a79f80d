"""MMRet-CLIP training (method.md §7): plain logic here, Dagster wiring in `assets.py`."""
