"""Hugging Face checkpoint import / export (safetensors), ``python -m tessera.convert``.

``load_hf(dir) -> (config, model)`` reads an HF model directory (config.json + safetensors)
onto the config's mesh one tensor at a time; ``import_hf`` writes a tessera workdir from it
(checkpoint + config) for ``tessera.train`` and ``tessera.serve.decode``; ``export_hf`` /
``save_hf`` write one back. Families are declared in ``families/`` (see ``mapping``).
"""

from tessera.convert.errors import ConversionError
from tessera.convert.exporter import export_hf, save_hf
from tessera.convert.families import FAMILIES, family_for
from tessera.convert.importer import Imported, import_hf, load_hf, read_hf

__all__ = [
    "FAMILIES",
    "ConversionError",
    "Imported",
    "export_hf",
    "family_for",
    "import_hf",
    "load_hf",
    "read_hf",
    "save_hf",
]
