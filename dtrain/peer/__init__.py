"""Where the planes meet: one peer's round engine and outer-loop component.

The only package that imports ``outer`` (maths), ``comm`` (collectives, state
transfer) and ``control`` (the coordinator client) together. ``train`` drives
it through :func:`dtrain.peer.outer_loop.OuterLoop`-style components and
``RoundEvent`` values; nothing here imports ``train``.
"""
