"""Configuration-server role (registration, policies, catalog API, plans): see issue 5."""
