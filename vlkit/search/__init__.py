"""Embeddings, the LanceDB index, search and the web page."""
