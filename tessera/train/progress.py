"""Console output of the train loop: a tqdm bar on a terminal, one line per log step otherwise,
and one line per evaluation either way."""

from __future__ import annotations

import sys


class Progress:
    """Train rows (``log``), eval rows (``log_eval``) and notes (``write``) on the console;
    ``unit`` names the throughput metric ``<unit>_per_s`` (tokens, examples, ...)."""

    def __init__(self, start: int, total: int, unit: str, enabled: bool):
        self.enabled, self.unit = enabled, unit
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        parts = [
            f"loss {row['loss']:.4f}",
            f"lr {row['learning_rate']:.2e}",
            f"gnorm {row['grad_norm']:.3f}",
        ]
        if f"{self.unit}_per_s" in row:
            parts.append(f"{row[f'{self.unit}_per_s']:.0f} {self.unit}/s")
        if "mfu" in row:
            parts.append(f"MFU {100 * row['mfu']:.1f}%")
        if self.bar is not None:
            self.bar.set_postfix_str(", ".join(parts))
        else:
            print(f"step {step}: " + ", ".join(parts), flush=True)

    def log_eval(self, step: int, row: dict) -> None:
        self.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
