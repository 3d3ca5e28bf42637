"""Training the tiny world: shared loop (`trainer.py`), one file per model, export to the real formats.

`python -m minipa.train --out weights/tiny --work runs/tiny` (or `minipa train …`) retrains everything.
"""
