"""The recorder: keeps the execution store up to date from the lifecycle events.

Run it as a process (``python -m recorder``), as many as you like (they share
one queue), or inside another asyncio process::

    recorder = Recorder(RecorderSettings(), connection=my_robust_connection)
    await recorder.start()
    ...
    await recorder.stop()
"""

from recorder.service import Recorder, RecorderStats
from recorder.settings import RecorderSettings

__all__ = ["Recorder", "RecorderSettings", "RecorderStats"]
