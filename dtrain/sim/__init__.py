"""The local multi-peer simulation behind ``dtrain-sim``: WAN emulator, chaos schedule, processes, summary."""
