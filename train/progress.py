"""The progress bar (tqdm: step, LM loss, tokens/s, ETA) and user-facing messages, rank 0 only."""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("train")


class Progress:
    def __init__(self, total_steps: int, start_step: int, *, is_main: bool, show_bar: bool):
        self.is_main = is_main
        self.bar = None
        self._redirect = None
        if is_main and show_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
            # log lines (Hydra's console handler) go above the bar instead of through it
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def update(self, step: int, **postfix) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix({k: v for k, v in postfix.items() if v is not None}, refresh=False)
        self.bar.update(step - self.bar.n)

    def say(self, message: str) -> None:
        """A message for the user: above the bar and into the log (train.log under Hydra)."""
        if not self.is_main:
            return
        log.info(message)
        if self.bar is not None and not _logs_to_console():
            self.bar.write(message)
        elif self.bar is None and not _logs_to_console():
            print(message, flush=True)

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _logs_to_console() -> bool:
    """True when the root logger has a stream handler (Hydra's default) that shows INFO."""
    root = logging.getLogger()
    return root.isEnabledFor(logging.INFO) and any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        for h in root.handlers)
