"""Ending a peer's server process: the one way every peer here stops its daemon."""

import subprocess


def stop_process(process, grace=15):
    """SIGTERM, then SIGKILL if it has not ended after `grace` seconds. A process that
    never started (None) or has already ended is left as it is."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
