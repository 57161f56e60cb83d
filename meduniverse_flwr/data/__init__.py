"""A node's data: its task from a source (``node_task``, ``sources``), sharded (``partition``) and
cached on disk (``cache``); the server's unlabelled corpus (``corpus``)."""
