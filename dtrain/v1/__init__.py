"""Generated wire contract (package ``dtrain.v1``) from ``proto/dtrain/v1/*.proto``.

Do not edit: run ``make proto`` after changing the .proto files; a test fails
when these modules drift from the sources.
"""
