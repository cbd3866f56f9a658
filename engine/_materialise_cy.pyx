# placeholder, replaced by the Cython twin
IMPLEMENTATION = "cython"
from engine.materialise_py import scan_batch, apply_to_pages, apply
