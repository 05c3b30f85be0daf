"""Repository: storage backends, the repository object layer, materializer and verifier."""
