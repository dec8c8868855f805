"""`clipbeam serve`: an index searched over HTTP and from a browser page (no Beam inside).

engine.py owns the model and the index; queries.py turns request bodies into
typed queries (or one-line 4xx errors); batcher.py groups concurrent queries
into one model call; app.py is the Starlette app; knn.py is the clip-retrieval
`clip back` compatible route; static/ holds the page.
"""
