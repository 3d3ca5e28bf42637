"""Key-name rules between checkpoint formats and minipa's modules. No model imports here.

minipa's parameter names mirror diffusers/transformers, so those formats map by identity.
Other formats (the original LDM single-file checkpoint) go through short rule tables, and a
test proves each table covers every key of the full-size models.
"""

from __future__ import annotations
