"""The fault plugin of the test suite (loaded through ``DTRAIN_FAULT_PLUGIN``, see ``dtrain.faults``).

Tests start the process under test with ``DTRAIN_FAULT_PLUGIN=fault_plugin.PLUGIN`` and these settings in
its environment (unset: no fault):

- ``DTRAIN_FAULT_EXIT_AFTER_COMMIT=R``: exit with status 137 right after round R
  committed, before its state is installed or anything is written (the crash
  between a commit and everything after it). Point ``after_commit``.
- ``DTRAIN_FAULT_POISON_ROUND=R``: the collective of round R sends garbage in
  every attempt (NaN floats for fp32, invalid scales for int8/int4), on grpc and
  gloo alike. By default the sender is hostile (or silently broken): it does not
  notice its own garbage and votes ok, so only the receivers' reports keep the
  garbage out. ``DTRAIN_FAULT_POISON_HONEST=1``: it notices (its own encoding is
  refused) and votes not ok. Wrap ``collective``.
- ``DTRAIN_FAULT_SLOW_PUSH_S=S``: the grpc collective sleeps S seconds before
  every shard chunk it sends, so that a collective lasts long enough to be
  interrupted; with ``DTRAIN_FAULT_SLOW_ROUND=R`` only in the first attempt of
  round R (its retry is quick). Wrap ``collective``.

The misbehaving collectives live in ``fault_doubles.py`` beside this file, loaded on first use so that a
test process importing this module (for ``PLUGIN``) does not import torch.
"""

import importlib.util
import logging
import os
import sys

PLUGIN = os.path.abspath(__file__)
log = logging.getLogger("dtrain")

_DOUBLES = "dtrain_fault_doubles"


def _doubles():
    module = sys.modules.get(_DOUBLES)
    if module is None:
        path = os.path.join(os.path.dirname(PLUGIN), "fault_doubles.py")
        spec = importlib.util.spec_from_file_location(_DOUBLES, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[_DOUBLES] = module
        spec.loader.exec_module(module)
    return module


def _int_env(name):
    text = os.environ.get(name, "")
    return int(text) if text else None


def point(name, **context):
    if name == "after_commit" and os.environ.get("DTRAIN_FAULT_EXIT_AFTER_COMMIT") == str(context["round"]):
        log.error("fault injection: exiting right after round %d committed", context["round"])
        os._exit(137)


def wrap(name, obj, **context):
    if name != "collective":
        return obj
    real, rnd = obj, context["round"]
    slow_s = float(os.environ.get("DTRAIN_FAULT_SLOW_PUSH_S") or 0)
    slow_round = _int_env("DTRAIN_FAULT_SLOW_ROUND")
    if slow_s > 0 and real.name == "grpc" and slow_round in (None, rnd):
        obj = _doubles().SlowPushCollective(obj, slow_s, first_attempt_only=slow_round is not None)
    if _int_env("DTRAIN_FAULT_POISON_ROUND") == rnd:
        hostile = os.environ.get("DTRAIN_FAULT_POISON_HONEST") != "1"
        obj = _doubles().PoisonedCollective(obj, real, hostile)
    return obj
