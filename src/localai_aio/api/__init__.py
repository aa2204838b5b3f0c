"""One module per API family; each exposes ``routes`` (a ``web.RouteTableDef``)."""
