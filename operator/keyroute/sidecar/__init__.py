"""The sidecar: the HTTP shell around the routing core (proxy, upstream client, config reload, metrics)."""
