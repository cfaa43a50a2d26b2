"""The app's routes, one router per concern: search, clip-retrieval's knn-service, images, index writes, and
operations (page, health, metrics)."""

from . import images, knn, ops, search, writes

ROUTERS = (ops.router, search.router, images.router, knn.router, writes.router)
