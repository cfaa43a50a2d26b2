"""Search with a trained model: a FAISS index over an image collection, queries, an HTTP service, selection."""
