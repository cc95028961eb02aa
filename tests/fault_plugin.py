"""The fault plugin of the test suite (loaded through ``DTRAIN_FAULT_PLUGIN``, see ``dtrain.faults``).

Settings come from the environment of the process under test:

- ``DTRAIN_FAULT_EXIT_AFTER_COMMIT=R``: exit with status 137 right after round R
  committed, before its state is installed or anything is written (the crash
  between a commit and everything after it).
"""

import logging
import os

PLUGIN = os.path.abspath(__file__)
log = logging.getLogger("dtrain")


def point(name, **context):
    if name == "after_commit" and os.environ.get("DTRAIN_FAULT_EXIT_AFTER_COMMIT") == str(context["round"]):
        log.error("fault injection: exiting right after round %d committed", context["round"])
        os._exit(137)
