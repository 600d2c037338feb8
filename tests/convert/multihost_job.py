"""The job tests/convert/test_multihost.py runs on 2 processes (``tessera.launch local``):
import a fixture into a workdir, then export it back, and write to ``OUT/process-I.json`` what
this process read (bytes per HF tensor) and which safetensors files it wrote.

  python -m tessera.launch local --num_processes=2 --cpu_devices=4 -- \
      python -m tests.convert.multihost_job FIXTURE OUT
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from tessera import distributed


def main(name: str, out: str) -> None:
    distributed.initialize()
    import jax

    from tessera.convert import export_hf, import_hf, importer, safetensors_io
    from tests.convert.helpers import fixture

    readers, written = [], []

    class Recorded(safetensors_io.SafetensorsReader):
        def __init__(self, directory: str):
            super().__init__(directory)
            readers.append(self)

    def save_file(tensors: dict, path: str, metadata: dict) -> None:
        written.append((os.path.basename(path), sorted(tensors)))
        save(tensors, path, metadata=metadata)

    save, safetensors_io.save_file = safetensors_io.save_file, save_file
    importer.SafetensorsReader = Recorded

    src = os.path.join(out, "hf")
    if jax.process_index() == 0:
        shutil.copytree(fixture(name), src)
        with open(os.path.join(src, "special_tokens_map.json"), "w") as f:
            f.write("{}\n")
    distributed.barrier("copied")
    work = os.path.join(out, "work")
    import_hf(src, work, overrides={"mesh.fsdp": 4, "mesh.tensor": 2})
    files = export_hf(work, os.path.join(out, "exported"), max_shard_bytes=40_000)[1]
    with open(os.path.join(out, f"process-{jax.process_index()}.json"), "w") as f:
        json.dump(
            {"bytes_read": dict(readers[0].bytes_read), "written": written, "files": files}, f
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
